"""Checks of the data: Great Expectations suites for the raw splits (raw.py, run by ge.py), plain numpy checks
for the processed arrays (processed.py), and what both report (common.py)."""

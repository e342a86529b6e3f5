"""Data tests: the download sources, the raw and processed splits' checks, on synthetic and real data."""

"""Great Expectations suites for the raw and processed splits."""

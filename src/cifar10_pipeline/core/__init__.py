"""Paths, params and data I/O every layer shares (numpy, pyarrow, pillow, pydantic)."""

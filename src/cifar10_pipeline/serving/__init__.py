"""The command-line classifier and the web service (FastAPI, uvicorn)."""

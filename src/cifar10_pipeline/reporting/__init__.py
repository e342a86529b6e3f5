"""Documents rendered from metrics/ (Jinja templates)."""

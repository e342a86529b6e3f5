"""Model architectures, their registry and inference (torch, transformers)."""

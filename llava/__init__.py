"""LLaVA-1.5 on transformers 5.x, with dynamic visual-token exit (DyVTE)."""

__version__ = "0.1.0"

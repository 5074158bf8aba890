"""Test and demo fixtures: tiny random checkpoints of our LLaVA layouts and of every VLM family, and the tokenizer
they share, all built offline. The library itself imports nothing from here."""

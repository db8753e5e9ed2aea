"""Experiments answering the background document's questions; see experiments/README.md."""

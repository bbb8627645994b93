"""Checkpoint files written from a plan's weights (GGUF: the types llama.cpp loads)."""

"""Latency lookup tables measured on the target GPU, predictions of plans, end-to-end checks."""

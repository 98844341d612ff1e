"""Candidates: a version staged as a vLLM LoRA adapter next to the served head (docs/candidates.md)."""

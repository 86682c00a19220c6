"""Checkpoints trained by the project and shipped with it (safetensors + config.json)."""

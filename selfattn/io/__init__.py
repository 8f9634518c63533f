"""Weights in and out: our safetensors checkpoints, Hugging Face directories."""

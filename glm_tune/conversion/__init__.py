"""Checkpoint layouts: Hugging Face <-> Paddle, transformers' GLM layout, safetensors, tensor-parallel shard merging."""

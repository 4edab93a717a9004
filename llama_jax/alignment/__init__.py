"""Alignment as Llama 2 did it: reward models, rejection sampling, PPO, DPO and Ghost Attention data."""

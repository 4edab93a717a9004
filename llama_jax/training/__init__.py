"""Pretraining: optimizer, jitted sharded train step, loop, metrics and evaluation."""

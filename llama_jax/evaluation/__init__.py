"""Benchmark evaluation: batched continuation log-likelihoods and the lm-evaluation-harness adapter."""

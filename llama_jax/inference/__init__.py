"""Inference: sharded KV cache, sampling, batched generation, text helpers and the chat session."""

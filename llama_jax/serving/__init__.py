"""`python -m llama_jax serve`: an OpenAI-compatible HTTP server over a dynamically batching decode engine."""

"""Load a checkpoint and serve it over HTTP with uvicorn until interrupted."""

from __future__ import annotations

from pathlib import Path

from llama_jax.extras import require
from llama_jax.inference.load import load_sharded
from llama_jax.serving.engine import BatchingConfig, Engine
from llama_jax.tokenizer import Tokenizer


def serve(checkpoint: str, tokenizer: str, host: str = "127.0.0.1", port: int = 8000, dtype: str | None = None,
          model_name: str | None = None, batching: BatchingConfig = BatchingConfig(), tensor: int = 1,
          quant: str | None = None) -> None:
    """Serve `checkpoint` (any format) under `model_name` (default: the checkpoint directory's name), its weights
    quantized as `quant` (int8 | int4) asks (default: as stored)."""
    require("fastapi", "uvicorn", extra="serve")
    import uvicorn

    from llama_jax.serving.api import create_app

    tok = Tokenizer(tokenizer)  # a bad path fails before the model loads
    model = load_sharded(checkpoint, dtype, tensor=tensor, quant=quant)
    if model.cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} pieces but the model only {model.cfg.vocab_size}; "
                         "pass the tokenizer the checkpoint was trained with")
    engine = Engine(model, tok, batching).start()
    try:
        uvicorn.run(create_app(engine, model_name or Path(checkpoint).resolve().name), host=host, port=port)
    finally:
        engine.close()

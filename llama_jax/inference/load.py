"""Load a checkpoint for inference onto a device mesh: what `serve` and the lm-eval adapter share."""

from __future__ import annotations

from llama_jax.checkpoints import load_pretrained
from llama_jax.config import MeshConfig
from llama_jax.model import Llama
from llama_jax.paths import PathLike
from llama_jax.sharding import check_model_fits, make_mesh


def load_sharded(checkpoint: PathLike, dtype: str | None = None, data: int = 1, fsdp: int = -1,
                 tensor: int = 1, quant: str | None = None) -> Llama:
    """Any checkpoint format, its parameters sharded over a (data, fsdp, tensor) mesh of all devices (-1 = the rest),
    quantized as `quant` asks (default: as the checkpoint stores it)."""
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    model = load_pretrained(checkpoint, dtype=dtype, mesh=mesh, **({} if quant is None else {"quant": quant}))
    check_model_fits(model.cfg, mesh)
    return model

"""`info`: a model's parameter count, parameter shapes and per-device shards on a mesh — without allocating it."""

from __future__ import annotations

from collections.abc import Sequence

from jax.sharding import Mesh

from llama_jax.config import Config, ExecutionConfig, LlamaConfig, apply_overrides, from_dict, load_config
from llama_jax.sharding import simulate_cpu_devices


def resolve(preset: str, config: str | None, overrides: Sequence[str]) -> Config:
    """Config from a YAML file, or defaults with the model preset `preset`; overrides applied last."""
    if config is not None:
        return load_config(config, overrides)
    return from_dict(Config, apply_overrides({"model": {"preset": preset}}, overrides))


def describe(cfg: LlamaConfig, execution: ExecutionConfig, mesh: Mesh) -> list[str]:
    """Lines: one per parameter (global shape -> per-device shard shape), then the totals."""
    import numpy as np
    from flax import nnx

    from llama_jax.model import Llama
    from llama_jax.sharding import abstract_init, bytes_per_device

    _, state = abstract_init(lambda: Llama(cfg, execution, rngs=nnx.Rngs(0)), mesh)
    lines = [f"{'parameter':42s} {'shape':>22s} {'axes':>36s} {'per-device shard':>22s}"]
    total = 0
    for path, var in nnx.to_flat_state(state):
        leaf = var.get_value()
        total += int(np.prod(leaf.shape))
        axes = ",".join(str(a) for a in var.get_metadata().get("axes", ()))
        shard = leaf.sharding.shard_shape(leaf.shape)
        lines.append(f"{'.'.join(map(str, path)):42s} {str(tuple(leaf.shape)):>22s} {axes:>36s} {str(shard):>22s}")
    per_device = bytes_per_device(state)
    lines.append(f"parameters: {total:,} (analytic {cfg.num_params():,})")
    lines.append(f"parameter bytes per device ({execution.param_dtype}): {per_device:,} = {per_device / 2**30:.2f} GiB")
    return lines


def print_info(preset: str, config: str | None, overrides: Sequence[str], devices: int) -> None:
    simulate_cpu_devices(devices)
    cfg = resolve(preset, config, overrides)

    import jax

    from llama_jax.sharding import check_model_fits, make_mesh

    mesh = make_mesh(cfg.mesh)
    check_model_fits(cfg.model, mesh)
    print(f"model: {cfg.model}")
    print(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices")
    print(f"execution: {cfg.execution}")
    print("\n".join(describe(cfg.model, cfg.execution, mesh)))

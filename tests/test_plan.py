"""`plan`: the real train step AOT-compiled for TPU slices (libtpu, no TPU) or simulated GPUs; memory per chip."""

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llama_jax.config import ConfigError, load_config
from llama_jax.plan import GIB, parse_topology, plan

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -r requirements-tpu-plan.txt)")
# A small model with the recipes' settings (scan + full remat, bf16 compute): compiles in seconds.
SMALL = ["model.preset=tiny", "model.scan_layers=true", "model.remat=full", "model.dtype=bfloat16",
         "data.seq_len=256", "mesh.fsdp=-1"]


@pytest.mark.parametrize("name, topology, chips", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-128", "v5p:4x4x4", 64), ("v5p-256", "v5p:4x4x8", 128), ("v4-8", "v4:2x2x1", 4),
    ("v4-32", "v4:2x2x4", 16), ("v5litepod-16", "v5e:4x4", 16), ("v5e-8", "v5e:2x4", 8), ("v6e-1", "v6e:1x1", 1),
    ("v6e-64", "v6e:8x8", 64), ("v5p:4x4x20", "v5p:4x4x20", 320),
])
def test_topology_names(name, topology, chips):
    assert parse_topology(name)[1:] == (topology, chips)


@pytest.mark.parametrize("name, message", [
    ("v9x-8", "unknown TPU topology 'v9x-8'"), ("tpu-128", "unknown TPU topology"), ("v5p-7", "must be even"),
    ("v5p-24", "12 chips has no standard slice shape"), ("v5e:4x4x4", "must have 2 dimensions"),
])
def test_topology_errors(name, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_topology(name)


@needs_libtpu
def test_small_model_on_v5p_8():
    result = plan(None, SMALL + ["train.batch_size=8"], topology="v5p-8")
    assert result.fits and len(result.target.devices) == 4
    assert result.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 1}
    # fp32 parameters split 4 ways; AdamW's two moments are twice the parameters.
    assert result.params_bytes == pytest.approx(load_config(None, SMALL).model.num_params() * 4 / 4, rel=0.01)
    assert result.opt_bytes == pytest.approx(2 * result.params_bytes, rel=0.01)
    assert 0 < result.temp_bytes < GIB
    assert result.flops_per_step == pytest.approx(load_config(None, SMALL).model.flops_per_token(256) * 8 * 256)
    assert "fits" in result.report() and "of 95 GiB" in result.report()
    assert "attention splash" in result.report()  # attention=auto on a TPU target


@needs_libtpu
def test_splash_attention_compiles_for_tpu_with_far_less_memory():
    """Attention forward + backward AOT-compiled for v5p-8: the Pallas kernel (a TPU custom call) needs a fraction of
    the temporaries of the einsum path, which holds [B, K, R, T, S] float32 scores."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from llama_jax.attention import Visibility, attention
    from llama_jax.config import MeshConfig
    from llama_jax.plan import tpu_target
    from llama_jax.sharding import make_mesh

    mesh = make_mesh(MeshConfig(1, -1, 1), tpu_target("v5p-8").devices)
    temp = {}
    with jax.set_mesh(mesh):
        q = jax.ShapeDtypeStruct((4, 2048, 4, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
        for impl in ("xla", "splash"):
            grad = jax.jit(jax.grad(lambda q: attention(q, q, q, Visibility(), impl).astype(jnp.float32).sum()))
            lowered = grad.lower(q)
            assert ("tpu_custom_call" in lowered.as_text()) == (impl == "splash")
            temp[impl] = lowered.compile().memory_analysis().temp_size_in_bytes
    assert temp["splash"] < 0.25 * temp["xla"]


@needs_libtpu
def test_mesh_that_does_not_divide_the_chips():
    with pytest.raises(ConfigError, match=re.escape("mesh data*fsdp*tensor = 3 but there are 4 devices")):
        plan(None, SMALL + ["mesh.fsdp=3"], topology="v5p-8")


def test_gpu_estimate_against_a_memory_budget():
    result = plan(None, SMALL + ["train.batch_size=8"], gpus=8, gpu_memory_gib=80)
    assert result.fits and len(result.target.devices) == 8 and result.mesh_shape["fsdp"] == 8
    assert "CPU compiler" in result.report()
    tight = dataclasses.replace(result, target=dataclasses.replace(result.target, memory_bytes=result.total_bytes - 1))
    assert not tight.fits and "does not fit" in tight.report()


def test_exactly_one_target():
    with pytest.raises(ConfigError, match="exactly one of --topology"):
        plan(None, [], topology="v5p-8", gpus=8)


def test_cli_unknown_topology_is_one_line():
    out = subprocess.run([sys.executable, "-m", "llama_jax", "plan", "--topology", "v5x-8"], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "unknown TPU topology 'v5x-8'" in out.stderr


@pytest.mark.slow
@needs_libtpu
def test_llama2_7b_on_v5p_8_fits_but_not_on_v5e_4():
    recipe = str(CONFIGS / "llama2_7b_v4_8.yaml")
    result = plan(recipe, [], topology="v5p-8")
    assert result.fits and result.params_bytes == pytest.approx(6.74e9 * 4 / 4, rel=0.01)
    small_hbm = plan(recipe, [], topology="v5litepod-4")  # 16 B/param / 4 chips > 16 GiB before any activation
    assert not small_hbm.fits and "does not fit" in small_hbm.report()


@pytest.mark.slow
@needs_libtpu
def test_llama2_70b_on_v5p_128():
    result = plan(str(CONFIGS / "llama2_70b_v5p_128.yaml"), [], topology="v5p-128")
    assert result.fits and result.params_bytes == pytest.approx(68.98e9 * 4 / 64, rel=0.01)

"""LoRA: fresh adapters leave the model unchanged, merging is exact, only adapters are trained and stored."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import lora
from llama_jax.config import Config, ConfigError, ExecutionConfig, LlamaConfig, LoraConfig, load_config
from llama_jax.model import Llama
from llama_jax.sharding import make_mesh
from llama_jax.training.step import Trainer

CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)
ALL = LoraConfig(rank=4, alpha=8.0, targets=[".*"])
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
forward = nnx.jit(lambda model, tokens: model(tokens))


def _randomise_b(model, seed=1):
    """Give every adapter a non-zero B, as training would."""
    for i, (_, _, _, _, adapter) in enumerate(lora.adapters(model)):
        adapter.b[...] = 0.3 * jax.random.normal(jax.random.key(seed + i), adapter.b.shape)


@pytest.mark.parametrize("scan", [False, True])
def test_zero_b_is_the_base_and_merge_equals_unmerged(scan):
    execution = ExecutionConfig(scan_layers=scan)
    model = Llama(CFG, execution, rngs=nnx.Rngs(0))
    base = forward(model, TOKENS)
    lora.attach(model, ALL, nnx.Rngs(1))
    assert len(list(lora.adapters(model))) == (1 if scan else 2) * 7
    np.testing.assert_array_equal(np.asarray(forward(model, TOKENS)), np.asarray(base))
    _randomise_b(model)
    adapted = forward(model, TOKENS)
    assert float(jnp.abs(adapted - base).max()) > 1e-2
    merged = lora.merge(model)
    assert not list(lora.adapters(merged)) and not nnx.state(merged, lora.LoRAParam)
    np.testing.assert_allclose(np.asarray(forward(merged, TOKENS)), np.asarray(adapted), rtol=1e-5, atol=1e-5)


def test_targets_by_name_peft_name_or_pattern():
    assert lora.resolve_targets(["q", "v_proj"]) == ["q", "v"]
    assert lora.resolve_targets([".*_proj"]) == list(lora.TARGETS)
    assert lora.resolve_targets(["gate|up|down"]) == ["gate", "up", "down"]
    with pytest.raises(ConfigError, match="lora.targets entry 'qq' matches no module"):
        lora.resolve_targets(["qq"])


def _adapter_sizes(cfg: LlamaConfig, rank: int, targets: list[str]) -> int:
    kv = cfg.n_kv_heads * cfg.head_dim
    io = {"q": (cfg.dim, cfg.dim), "k": (cfg.dim, kv), "v": (cfg.dim, kv), "o": (cfg.dim, cfg.dim),
          "gate": (cfg.dim, cfg.hidden_dim), "up": (cfg.dim, cfg.hidden_dim), "down": (cfg.hidden_dim, cfg.dim)}
    return cfg.n_layers * sum(rank * (io[t][0] + io[t][1]) for t in targets)


def test_llama2_7b_optimizer_state_holds_only_adapters():
    cfg = Config(model=LlamaConfig.preset("llama2-7b"), lora=LoraConfig(rank=16, targets=["q", "k", "v", "o"]))
    cfg.execution = ExecutionConfig(param_dtype="bfloat16", dtype="bfloat16", scan_layers=True)
    trainer = Trainer(cfg, make_mesh(cfg.mesh))
    state = trainer.abstract_state()
    adapters = _adapter_sizes(cfg.model, 16, ["q", "k", "v", "o"])
    assert adapters == 16 * 32 * 4 * (4096 + 4096)  # 8.4M of 6.7B
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)) == adapters
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(math.prod(x.shape) for x in moments) == 2 * adapters  # Adam's mu and nu, nothing else
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    frozen = trainer.abstract_frozen()
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(frozen)) == cfg.model.num_params()
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype("bfloat16")}


@pytest.mark.torch_ref
def test_peft_loads_our_adapter_onto_the_hf_export_with_our_logits(tmp_path):
    scan = True  # stacked adapters; the reload below goes onto unstacked layers
    import peft
    import torch
    import transformers
    from llama_jax.checkpoints import load_pretrained, save_pretrained
    from llama_jax.checkpoints.peft import load_peft, merge_adapter, read_peft_config, save_peft

    model = Llama(CFG, ExecutionConfig(scan_layers=scan), rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path / "base", "hf")
    cfg = LoraConfig(rank=4, alpha=8.0, targets=[".*"])
    lora.attach(model, cfg, nnx.Rngs(1))
    _randomise_b(model)
    ours = np.asarray(forward(model, TOKENS))
    save_peft(model, cfg, tmp_path / "adapter")
    assert read_peft_config(tmp_path / "adapter") == LoraConfig(rank=4, alpha=8.0, targets=sorted(lora.PEFT_MODULES.values()))

    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32,
                                                       attn_implementation="eager")
    with torch.no_grad():
        base_logits = hf(torch.tensor(np.asarray(TOKENS))).logits.numpy()
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")(torch.tensor(np.asarray(TOKENS))).logits
    assert np.abs(base_logits - ours).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(theirs.numpy(), ours, rtol=1e-4, atol=1e-4)

    reloaded = load_peft(load_pretrained(tmp_path / "base", scan_layers=not scan), tmp_path / "adapter")
    np.testing.assert_allclose(np.asarray(forward(reloaded, TOKENS)), ours, rtol=1e-5, atol=1e-5)
    merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", "orbax")
    np.testing.assert_allclose(np.asarray(forward(load_pretrained(tmp_path / "merged"), TOKENS)), ours,
                               rtol=1e-5, atol=1e-5)


def test_plan_reports_adapters_frozen_base_and_optimizer_per_device():
    from llama_jax.plan import plan
    small = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.vocab_size=256", "data.seq_len=64",
             "train.batch_size=8", "execution.param_dtype=bfloat16", "lora.rank=4"]
    result = plan(None, small, gpus=8, gpu_memory_gib=80)
    model = load_config(None, small).model
    adapters = _adapter_sizes(model, 4, ["q", "k", "v", "o"])
    assert result.frozen_bytes == pytest.approx(model.num_params() * 2 / 8, rel=0.05)  # bf16 over fsdp 8
    assert adapters * 4 / 8 <= result.params_bytes <= adapters * 4  # float32 adapters, A sharded over fsdp
    assert result.opt_bytes == pytest.approx(2 * result.params_bytes, rel=0.05)
    report = result.report()
    assert "LoRA adapters" in report and "frozen base" in report

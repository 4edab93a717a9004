"""The one parameter format: exports and training steps hold the same items, and the layouts written before the
architecture/execution split still load."""

import dataclasses
import json

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from llama_jax import Llama, LlamaConfig, load_pretrained, save_pretrained
from llama_jax.checkpoints.manager import Checkpointer
from llama_jax.config import CheckpointConfig, Config, ExecutionConfig

TINY = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)
OLD_MODEL_SECTION = {**dataclasses.asdict(TINY), "param_dtype": "float32", "dtype": "float32", "remat": "none",
                     "scan_layers": False}


def _model() -> Llama:
    return Llama(TINY, rngs=nnx.Rngs(3))


def _assert_same(a: Llama, b: Llama) -> None:
    for x, y in zip(*(nnx.to_flat_state(nnx.state(m, nnx.Param)) for m in (a, b)), strict=True):
        assert x[0] == y[0]
        np.testing.assert_array_equal(np.asarray(x[1].get_value()), np.asarray(y[1].get_value()))


def _items(path) -> set[str]:
    """Item directories (Orbax's own bookkeeping files aside)."""
    return {p.name for p in path.iterdir() if p.is_dir()}


def test_export_and_training_step_share_the_parameter_items(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "export", format="orbax")
    ckpt = Checkpointer(tmp_path / "run", CheckpointConfig(async_save=False))
    ckpt.save(5, nnx.state(model, nnx.Param), {"count": np.zeros(())}, {}, Config(model=TINY))
    ckpt.close()
    assert _items(tmp_path / "export") == {"model", "params"}
    assert _items(tmp_path / "run" / "5") == {"model", "params", "opt_state", "meta", "config"}
    read = ocp.Checkpointer(ocp.JsonCheckpointHandler())
    assert read.restore(tmp_path / "export" / "model") == read.restore(tmp_path / "run" / "5" / "model") == {
        "architecture": TINY.to_dict(), "scan_layers": False, "param_dtype": "float32", "quant": "none",
        "quant_group_size": 128}
    _assert_same(load_pretrained(tmp_path / "export"), load_pretrained(tmp_path / "run"))


def test_a_scanned_bfloat16_run_loads_unrolled_in_float32(tmp_path):
    scanned = ExecutionConfig(scan_layers=True, param_dtype="bfloat16", dtype="bfloat16")
    model = load_pretrained(save_pretrained(_model(), tmp_path / "export", format="orbax"), execution=scanned)
    ckpt = Checkpointer(tmp_path / "run", CheckpointConfig(async_save=False))
    ckpt.save(1, nnx.state(model, nnx.Param), {"count": np.zeros(())}, {}, Config(model=TINY, execution=scanned))
    ckpt.close()
    unrolled = load_pretrained(tmp_path / "run", dtype="float32")
    assert unrolled.execution == ExecutionConfig()
    for i in range(TINY.n_layers):
        np.testing.assert_array_equal(np.asarray(unrolled.layers[i].attention.wk[...]),
                                      np.asarray(model.layers.attention.wk[...][i]).astype(np.float32))


def test_legacy_export_with_llama_config_json_loads(tmp_path):
    model = _model()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "old" / "params", nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    (tmp_path / "old" / "llama_config.json").write_text(json.dumps(OLD_MODEL_SECTION))
    _assert_same(load_pretrained(tmp_path / "old"), model)


def test_legacy_run_step_without_model_item_loads(tmp_path):
    """Steps saved before `model/` existed: params as nnx Variables, the model section inside the run config."""
    model = _model()
    raw_config = {**Config(model=TINY).to_dict(), "model": OLD_MODEL_SECTION, "retired_section": {"x": 1}}
    raw_config.pop("execution")
    with ocp.CheckpointManager((tmp_path / "run").absolute()) as manager:
        manager.save(7, args=ocp.args.Composite(params=ocp.args.StandardSave(nnx.state(model, nnx.Param)),
                                                config=ocp.args.JsonSave(raw_config)))
    _assert_same(load_pretrained(tmp_path / "run"), model)


def test_orbax_export_with_overwrite_replaces_the_old_one(tmp_path):
    save_pretrained(_model(), tmp_path / "export", format="orbax")
    newer = Llama(TINY, rngs=nnx.Rngs(4))
    save_pretrained(newer, tmp_path / "export", format="orbax", overwrite=True)
    _assert_same(load_pretrained(tmp_path / "export"), newer)

"""Config presets, YAML + overrides, and one-line errors."""

import dataclasses

import pytest

from llama_jax.config import EXECUTION_FIELDS, ConfigError, ExecutionConfig, LlamaConfig, load_config


def test_presets_match_meta_params():
    assert LlamaConfig.preset("llama2-7b").hidden_dim == 11008
    assert LlamaConfig.preset("llama2-13b").hidden_dim == 13824
    seventy = LlamaConfig.preset("llama2-70b")
    assert (seventy.hidden_dim, seventy.n_kv_heads, seventy.n_rep) == (28672, 8, 8)
    assert 0.9e6 < LlamaConfig.preset("tiny").num_params() < 1.1e6
    assert LlamaConfig.preset("stories15m").num_params() == 15_191_712
    assert LlamaConfig.preset("stories110m").num_params() == 109_529_856


@pytest.mark.parametrize("kwargs,message", [
    (dict(dim=100, n_heads=3), "divisible by model.n_heads"),
    (dict(dim=64, n_heads=4, n_kv_heads=3), "divisible by model.n_kv_heads"),
    (dict(dim=60, n_heads=4), "must be even"),
])
def test_inconsistent_config_raises(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LlamaConfig(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(remat="ful"), "execution.remat 'ful' is not one of .* \\(did you mean 'full'\\?\\)"),
    (dict(dtype="fp8"), "execution.dtype 'fp8' is not one of"),
    (dict(dropout=1.0), "execution.dropout must be in \\[0, 1\\), got 1.0"),
])
def test_bad_execution_settings_raise(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ExecutionConfig(**kwargs)


def test_architecture_is_immutable_and_execution_is_not_part_of_it():
    cfg = LlamaConfig.preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 3
    assert not set(EXECUTION_FIELDS) & {f.name for f in dataclasses.fields(LlamaConfig)}
    with pytest.raises(ConfigError, match="'model.dtype' is an execution setting, not architecture; write it as "
                                          "execution.dtype"):
        load_config(None, ["model.dtype=bfloat16"])


def test_shape_differences_name_only_fields_that_change_parameter_shapes():
    base = LlamaConfig.preset("tiny")
    assert base.shape_differences(dataclasses.replace(base, max_seq_len=64, rope_theta=5e5)) == []
    assert base.shape_differences(dataclasses.replace(base, multiple_of=64)) == ["hidden_dim: 352 vs 384"]


def test_unknown_preset_suggests_nearest():
    with pytest.raises(ConfigError, match="did you mean 'llama2-7b'"):
        LlamaConfig.preset("llama2-7")


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: stories15m\nexecution:\n  scan_layers: true\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["optim.lr=2e-3", "mesh.tensor=2", "execution.remat=full"])
    assert (cfg.model.dim, cfg.execution.scan_layers, cfg.execution.remat) == (288, True, "full")
    assert cfg.optim.lr == 2e-3 and cfg.mesh.tensor == 2


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr' \\(did you mean 'optim.lr'\\?\\)"),
    ("model.dim=abc", "model.dim must be an integer"),
    ("train.steps=1.5", "train.steps must be an integer"),
    ("nonsense", "must look like section.key=value"),
    ("modle.dim=3", "did you mean 'model'"),
])
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")

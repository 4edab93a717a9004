"""Config presets, YAML + overrides, and one-line errors."""

import pytest

from llama_jax.config import ConfigError, LlamaConfig, load_config


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
    (dict(remat="ful"), "did you mean 'full'"),
    (dict(dtype="fp8"), "is not one of"),
])
def test_inconsistent_config_raises(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LlamaConfig(**kwargs)


def test_unknown_preset_suggests_nearest():
    with pytest.raises(ConfigError, match="did you mean 'llama2-7b'"):
        LlamaConfig.preset("llama2-7")


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: stories15m\n  scan_layers: true\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["optim.lr=2e-3", "mesh.tensor=2", "model.remat=full"])
    assert (cfg.model.dim, cfg.model.scan_layers, cfg.model.remat) == (288, True, "full")
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

"""float16 training with loss scaling (`optim.loss_scale`): an injected overflow skips that update and halves the
scale, no Inf/NaN reaches the parameters, the scale doubles after `loss_scale_period` clean steps, and fp16 follows
the fp32 loss curve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_errors import files  # noqa: F401 - the tokenizer/corpus/config fixture, built in tmp
from test_train_step import batches, init_params, tiny_config  # noqa: F401 - fixtures reused from test_train_step

from llama_jax.config import ConfigError, ExecutionConfig, MeshConfig, OptimConfig, load_config
from llama_jax.sharding import make_mesh
from llama_jax.training.loss_scale import INITIAL_SCALE, LossScaling
from llama_jax.training.step import Trainer, TrainState

FP16 = ExecutionConfig(dtype="float16", param_dtype="float32")
PERIOD = 5


def trainer_for(execution: ExecutionConfig, **optim) -> Trainer:
    cfg = tiny_config(**optim)
    cfg.execution = execution
    return Trainer(cfg, make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]))


@pytest.fixture(scope="module")
def fp16():
    """One compiled fp16 trainer (dynamic scale doubling every PERIOD clean steps) used by every test here."""
    return trainer_for(FP16, loss_scale_period=PERIOD)


def with_scale(state: TrainState, scale: float) -> TrainState:
    return TrainState(state.step, state.params, state.opt_state._replace(scale=jnp.float32(scale)))


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_loss_scale_setting_resolves():
    assert LossScaling.from_config(OptimConfig(), FP16) == LossScaling(INITIAL_SCALE, True, 2000)
    assert LossScaling.from_config(OptimConfig(), ExecutionConfig(dtype="bfloat16")) is None
    assert LossScaling.from_config(OptimConfig(loss_scale="128"), ExecutionConfig()) == LossScaling(128.0, False, 2000)
    assert LossScaling.from_config(OptimConfig(loss_scale="none"), FP16) is None
    with pytest.raises(ConfigError, match="optim.loss_scale 'dynamc' is not one of .* \\(did you mean 'dynamic'"):
        load_config(None, ["optim.loss_scale=dynamc"])


@pytest.mark.e2e
def test_injected_overflow_skips_the_update_lowers_the_scale_and_training_goes_on(fp16, init_params):  # noqa: F811
    state = with_scale(fp16.init_state(init_params), 2.0**26)  # far past fp16's 65504: the gradients overflow
    losses, overflows = [], 0
    for batch in batches(12):
        before, scale = host((state.params, state.opt_state.inner)), float(state.opt_state.scale)
        state, metrics = fp16.train_step(state, batch)
        assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))  # not a train.nonfinite step
        after = host((state.params, state.opt_state.inner))
        assert all(np.isfinite(p).all() for p in after)
        if bool(metrics["overflow"]):
            overflows += 1
            assert float(state.opt_state.scale) == scale / 2 and int(metrics["overflow_skips"]) == overflows
            for old, new in zip(before, after, strict=True):
                np.testing.assert_array_equal(new, old)  # the update was skipped, moments included
        else:
            assert not all(np.array_equal(old, new) for old, new in zip(before, after))  # the moments moved
            losses.append(float(metrics["loss"]))
    assert overflows >= 2 and len(losses) >= 4, (overflows, losses)  # regrowth may overflow again
    assert int(state.opt_state.skipped) == overflows
    assert losses[-1] < losses[0] - 0.5, losses  # and training went on


def test_scale_doubles_after_period_clean_steps(fp16, init_params):  # noqa: F811
    state = with_scale(fp16.init_state(init_params), 1.0)
    scales = []
    for batch in batches(2 * PERIOD + 1):
        state, metrics = fp16.train_step(state, batch)
        assert not bool(metrics["overflow"])
        scales.append(float(state.opt_state.scale))
    assert scales == [1] * (PERIOD - 1) + [2] * PERIOD + [4, 4]


@pytest.mark.e2e  # a compile of its own (~10 s)
def test_an_overflow_at_a_static_scale_is_a_nonfinite_step(init_params):  # noqa: F811
    trainer = trainer_for(FP16, loss_scale=str(2.0**30))
    state = trainer.init_state(init_params)
    before = host((state.params, state.opt_state))
    state, metrics = trainer.train_step(state, batches(1)[0])
    assert not bool(metrics["finite"]) and not bool(metrics["overflow"])  # train.nonfinite decides
    for old, new in zip(before, host((state.params, state.opt_state)), strict=True):
        np.testing.assert_array_equal(new, old)


def test_fp16_follows_the_fp32_loss_curve(fp16, init_params):  # noqa: F811
    data = batches(12)
    curves = {}
    for name, trainer in (("fp32", trainer_for(ExecutionConfig())), ("fp16", fp16)):
        state = trainer.init_state(init_params)
        curves[name] = []
        for batch in data:
            state, metrics = trainer.train_step(state, batch)
            curves[name].append(float(metrics["loss"]))
    assert int(state.opt_state.skipped) == 0 and float(state.opt_state.scale) == INITIAL_SCALE * 4
    assert curves["fp32"][-1] < curves["fp32"][0] - 1.0
    np.testing.assert_allclose(curves["fp16"], curves["fp32"], rtol=0.01)


@pytest.mark.e2e
def test_fp16_run_logs_the_scale_and_resumes_it(files, tmp_path, capsys):  # noqa: F811
    from llama_jax.training.loop import train
    overrides = ["execution.dtype=float16", "optim.loss_scale_period=2", f"checkpoint.dir={tmp_path / 'run'}",
                 "checkpoint.every=2", "checkpoint.async_save=false"]
    train(load_config(files["config"], [*overrides, "train.steps=3"]))
    logged = capsys.readouterr().out
    assert "train step 1: " in logged and "loss_scale 6.554e+04 overflow_skips 0" in logged
    assert "train step 3: " in logged and "loss_scale 1.311e+05" in logged  # doubled after 2 clean steps
    result = train(load_config(files["config"], [*overrides, "train.steps=5"]))  # resumes from step 3
    assert result.step == 5 and float(result.state.opt_state.scale) == INITIAL_SCALE * 4

"""NaN/Inf policy (`train.nonfinite`), tested by injecting a batch whose target id lies outside the vocabulary (its
cross-entropy is NaN): the step never lets NaN into the state; `halt` stops at that step saving nothing newer;
`skip` drops it and goes on, halting after `train.max_nonfinite_skips` in a row."""

import jax
import numpy as np
import pytest
from test_errors import files  # noqa: F401 - the tokenizer/corpus/config fixture, built in tmp

import llama_jax.training.loop as loop
from llama_jax.config import Config, LlamaConfig, MeshConfig, OptimConfig, load_config
from llama_jax.errors import TrainingHalted
from llama_jax.sharding import make_mesh
from llama_jax.training.step import Trainer

VOCAB = 300


def poison(batch: dict) -> dict:
    tokens = np.array(batch["tokens"])
    tokens[0, -1] = VOCAB  # a target id outside the vocabulary: NaN loss and gradients
    return {**batch, "tokens": tokens}


def test_a_nonfinite_step_leaves_the_state_untouched():
    cfg = Config(model=LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=VOCAB, multiple_of=16, max_seq_len=16),
                 optim=OptimConfig(lr=1e-2, warmup_steps=1))
    trainer = Trainer(cfg, make_mesh(MeshConfig(1, -1, 1)))
    batch = {"tokens": np.random.default_rng(0).integers(0, VOCAB, (8, 17)).astype(np.int32)}
    state, metrics = trainer.train_step(trainer.init_state(), batch)
    assert bool(metrics["finite"])
    before = jax.device_get((state.params, state.opt_state))
    state, metrics = trainer.train_step(state, poison(batch))
    assert not bool(metrics["finite"]) and np.isnan(float(metrics["loss"])) and int(state.step) == 2
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves((state.params, state.opt_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(new), old)
    state, metrics = trainer.train_step(state, batch)  # and training goes on from there
    assert bool(metrics["finite"]) and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


class PoisonedData:
    """The real training data, with the batches of the given (1-based) steps poisoned."""

    def __init__(self, data, steps):
        self.data, self.steps, self.calls = data, set(steps), 0

    def __next__(self):
        self.calls += 1
        batch = next(self.data)
        return poison(batch) if self.calls in self.steps else batch

    def __getattr__(self, name):
        return getattr(self.data, name)


def run(files, tmp_path, monkeypatch, poisoned, *overrides):  # noqa: F811
    build = loop.build_train_data
    monkeypatch.setattr(loop, "build_train_data", lambda *a, **k: PoisonedData(build(*a, **k), poisoned))
    cfg = load_config(files["config"], [f"checkpoint.dir={tmp_path / 'run'}", "train.steps=5", "checkpoint.every=1",
                                        "checkpoint.async_save=false", *overrides])
    return loop.train(cfg)


def saved_steps(run_dir):
    return sorted(int(p.name) for p in run_dir.iterdir() if p.name.isdigit())


@pytest.mark.e2e
def test_halt_names_the_step_and_metric_and_saves_nothing_newer(files, tmp_path, monkeypatch, capsys):  # noqa: F811
    with pytest.raises(TrainingHalted, match=r"step 3: loss is nan; halted \(train.nonfinite=halt\), "
                                             r"the last checkpoint \(step 2\) is kept"):
        run(files, tmp_path, monkeypatch, {3})
    assert saved_steps(tmp_path / "run") == [1, 2]
    assert not (tmp_path / "run" / ".lock").exists()


@pytest.mark.e2e
def test_skip_drops_the_update_and_goes_on(files, tmp_path, monkeypatch, capsys):  # noqa: F811
    from llama_jax import load_pretrained
    result = run(files, tmp_path, monkeypatch, {2, 4}, "train.nonfinite=skip")
    assert result.step == 5 and np.isfinite(result.train_loss)
    err = capsys.readouterr().err
    assert "step 2: loss is nan" in err and "update skipped (2 so far" in err
    model = load_pretrained(tmp_path / "run")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(model))


@pytest.mark.e2e
def test_skip_halts_after_max_skips_in_a_row(files, tmp_path, monkeypatch):  # noqa: F811
    with pytest.raises(TrainingHalted, match=r"step 4: .* 3 steps in a row were skipped"):
        run(files, tmp_path, monkeypatch, {2, 3, 4, 5}, "train.nonfinite=skip", "train.max_nonfinite_skips=3")
    assert saved_steps(tmp_path / "run") == [1, 2, 3]

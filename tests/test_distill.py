"""Knowledge distillation: the loss against a NumPy reference (KL at temperature T, times T^2, mixed with CE), the
distillation step lowering its loss with a hidden-state projection, and the CLI's one-line errors."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from test_errors import fails_cleanly, files  # noqa: F401 - the tokenizer/corpus/config fixture, built in tmp
from test_train_step import batches

from llama_jax import Llama
from llama_jax.config import Config, DistillConfig, LlamaConfig, MeshConfig, OptimConfig
from llama_jax.sharding import make_mesh
from llama_jax.training.distill import PROJECTION, distill_objective, distillation_losses, plain_student
from llama_jax.training.step import Trainer


def numpy_reference(student, teacher, targets, alpha, t):
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p_teacher = np.exp(log_softmax(teacher / t))
    kl = (p_teacher * (log_softmax(teacher / t) - log_softmax(student / t))).sum(-1)
    ce = -np.take_along_axis(log_softmax(student), targets[..., None], -1)[..., 0]
    return alpha * t * t * kl + (1 - alpha) * ce, kl


@pytest.mark.parametrize("alpha, temperature", [(1.0, 1.0), (1.0, 4.0), (0.0, 2.0), (0.3, 2.5)])
def test_loss_equals_numpy_reference(alpha, temperature):
    rng = np.random.default_rng(0)
    student, teacher = (rng.normal(0, 3, (2, 5, 50)).astype(np.float64) for _ in range(2))
    targets = rng.integers(0, 50, (2, 5))
    got = np.asarray(distillation_losses(student.astype(np.float32), teacher.astype(np.float32), targets, alpha,
                                         temperature))
    want, kl = numpy_reference(student, teacher, targets, alpha, temperature)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert (kl > 0.01).all()  # the KL term is really there
    same = np.asarray(distillation_losses(teacher.astype(np.float32), teacher.astype(np.float32), targets, 1.0, 2.0))
    np.testing.assert_allclose(same, 0.0, atol=1e-5)  # a student equal to its teacher has no KL


@pytest.mark.e2e
def test_distillation_lowers_its_loss_and_learns_the_projection():
    teacher_cfg = LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                              max_seq_len=32)
    cfg = Config(model=LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=256, multiple_of=16, max_seq_len=32),
                 optim=OptimConfig(lr=1e-2, warmup_steps=1), distill=DistillConfig(alpha=0.7, hidden_weight=0.5))
    cfg.train.steps = 10
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    trainer = Trainer(cfg, mesh, distill_objective(cfg, Llama(teacher_cfg, rngs=nnx.Rngs(1)), mesh))
    state = trainer.init_state()
    projection = np.asarray(nnx.to_pure_dict(state.params)[PROJECTION])
    assert projection.shape == (32, 64)
    losses = []
    for batch in batches(10):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.3, losses
    assert not np.allclose(np.asarray(nnx.to_pure_dict(state.params)[PROJECTION]), projection)
    student = plain_student(trainer, state.params)
    assert isinstance(student, Llama) and not hasattr(student, PROJECTION)
    tokens = batches(1)[0]["tokens"][:, :-1]
    np.testing.assert_array_equal(np.asarray(student(tokens)), np.asarray(trainer.model(state.params)(tokens)))


def test_cli_errors_are_one_line(files, tmp_path, capsys):  # noqa: F811
    config = str(files["config"])
    fails_cleanly(["distill", "--config", config], capsys, files["root"], "distill.teacher is not set")
    fails_cleanly(["distill", "--config", config, f"distill.teacher={tmp_path / 'missing'}"], capsys, files["root"],
                  "does not exist")
    fails_cleanly(["distill", "--config", config, "distill.alpha=2"], capsys, files["root"], "distill.alpha")


@pytest.mark.e2e
def test_demo_shortened_student_distilled_beats_scratch(tmp_path, tfds_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "experiments"))
    import distill_example
    results = distill_example.run(tmp_path, str(tfds_dir), 0.03, "train.batch_size=8")
    assert results["teacher"]["validation_loss"] < results["scratch"]["validation_loss"]
    assert results["distilled"]["validation_loss"] < results["scratch"]["validation_loss"]
    assert results["distilled"]["bits_per_byte"] < results["scratch"]["bits_per_byte"]
    assert (tmp_path / "results.json").is_file()

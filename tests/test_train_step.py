"""Train step: mesh invariance, gradient accumulation, the optimizer recipe and a torch/transformers reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from chains import assert_chains_train_as_one
from flax import nnx

from llama_jax import Llama, save_pretrained
from llama_jax.config import Config, ExecutionConfig, LlamaConfig, MeshConfig, OptimConfig
from llama_jax.sharding import make_mesh
from llama_jax.training.optim import accumulate_gradients, decay_mask, gradient_chains, lr_schedule
from llama_jax.training.step import Trainer

SEQ = 32


def tiny_config(n_layers: int = 1, **optim) -> Config:
    cfg = Config()
    cfg.model = LlamaConfig(dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                            max_seq_len=SEQ)
    cfg.optim = OptimConfig(**{"lr": 1e-2, "warmup_steps": 1, **optim})
    cfg.train.steps = 20
    return cfg


def batches(n: int, batch: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Rows count up from a random start (mod 256): a pattern the model can learn in a few steps."""
    rng = np.random.default_rng(seed)
    return [{"tokens": ((rng.integers(0, 256, (batch, 1)) + np.arange(SEQ + 1)) % 256).astype(np.int32)}
            for _ in range(n)]


@pytest.fixture(scope="module")
def init_params():
    """One random initialisation (host arrays) shared by every run, so runs differ only in what is tested."""
    return jax.device_get(nnx.state(Llama(tiny_config().model, rngs=nnx.Rngs(0))))


def run(cfg: Config, mesh_shape: tuple[int, int, int], data: list[dict[str, np.ndarray]], params) -> tuple[list[float], dict]:
    trainer = Trainer(cfg, make_mesh(MeshConfig(*mesh_shape), jax.devices()[:math.prod(mesh_shape)]))
    state = trainer.init_state(params)
    losses = []
    for batch in data:
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, nnx.to_pure_dict(jax.device_get(state.params))


def test_same_losses_on_every_mesh(init_params):
    data = batches(3)
    reference, _ = run(tiny_config(), (8, 1, 1), data, init_params)
    assert reference[2] < reference[0] - 1e-3  # the updates really changed the model
    for shape in [(1, 8, 1), (2, 2, 2)]:
        losses, _ = run(tiny_config(), shape, data, init_params)
        np.testing.assert_allclose(losses, reference, rtol=1e-5, err_msg=str(shape))


@pytest.mark.e2e
def test_gradient_accumulation_equals_big_batch(init_params):
    data = batches(2, batch=8)
    big_losses, big_params = run(tiny_config(), (2, 1, 1), data, init_params)
    acc_losses, acc_params = run(tiny_config(grad_accum_steps=4), (2, 1, 1), data, init_params)
    np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc_params), jax.tree.leaves(big_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_microbatches_split_into_chains_each_piece_numbered():
    """Microbatch i takes rows i, i+steps, ...; each is split the same way into chains; every row is seen once, by
    the piece that `grad_fn` is told (pieces 0..steps*chains-1, so each draws its own dropout masks)."""
    batch = {"x": jnp.arange(8, dtype=jnp.float32)}

    def grad_fn(params, rows, piece):
        seen = jnp.zeros(8).at[rows["x"].astype(jnp.int32)].add(piece + 1.0)
        loss_sum = jnp.sum(rows["x"]) * params["w"]
        return (loss_sum, (jnp.float32(rows["x"].shape[0]), {"seen": seen})), {"w": jnp.sum(rows["x"])}

    for steps, chains, seen in [(1, 1, [1] * 8), (1, 2, [1, 2] * 4), (2, 1, [1, 2] * 4),
                                (2, 2, [1, 3, 2, 4] * 2), (4, 2, [1, 3, 5, 7, 2, 4, 6, 8])]:
        grads, loss_sum, count, sums = jax.jit(accumulate_gradients, static_argnums=(0, 3, 4))(
            grad_fn, {"w": jnp.float32(2.0)}, batch, steps, chains)
        assert (float(loss_sum), float(count), float(grads["w"])) == (56.0, 8.0, 3.5), (steps, chains)
        np.testing.assert_array_equal(sums["seen"], seen, err_msg=f"steps={steps} chains={chains}")


def test_one_device_cpu_steps_run_two_chains_with_the_same_result(init_params):
    """On a one-device CPU mesh the step differentiates two half-batch chains (twice the products in the compiled
    program) and updates the model as one chain does."""
    assert [gradient_chains("cpu", 1, 8), gradient_chains("cpu", 1, 7), gradient_chains("cpu", 2, 8),
            gradient_chains("gpu", 1, 8), gradient_chains("tpu", 1, 8)] == [2, 1, 1, 1, 1]
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    assert_chains_train_as_one(lambda: Trainer(tiny_config(), mesh), lambda t: t.init_state(init_params), batches(2),
                               atol=1e-7)


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_each_microbatch_draws_its_own_dropout_masks(init_params, rate):
    """Two copies of one row as two microbatches: with dropout their losses differ (each piece folds its number into
    the step's key), so the mean is not the single row's loss; without dropout it is."""
    cfg = tiny_config()
    cfg.execution = ExecutionConfig(dropout=rate)
    row = batches(1, batch=1)[0]
    losses = []
    for steps, batch in ((1, row), (2, {"tokens": np.repeat(row["tokens"], 2, axis=0)})):
        cfg.optim = OptimConfig(lr=1e-2, warmup_steps=1, grad_accum_steps=steps)
        trainer = Trainer(cfg, make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]))
        losses.append(float(trainer.train_step(trainer.init_state(init_params), batch)[1]["loss"]))
    if rate:
        assert abs(losses[1] - losses[0]) > 1e-3, losses
    else:
        assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_schedule_and_decay_mask():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    schedule = lr_schedule(cfg, 110)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(60)) == pytest.approx(0.55, rel=1e-5)  # half-way down the cosine
    assert float(schedule(110)) == pytest.approx(0.1, rel=1e-5)
    params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Llama(tiny_config().model, rngs=nnx.Rngs(0)))))
    mask = decay_mask(params)
    assert mask["tok_embeddings"] and mask["output"] and mask["layers"][0]["attention"]["wq"]
    assert not mask["norm"]["weight"] and not mask["layers"][0]["ffn_norm"]["weight"]


def torch_lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return step / warmup
    progress = min(step - warmup, total - warmup) / (total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.torch_ref
def test_twenty_adamw_steps_match_torch(tmp_path):
    import torch
    import transformers

    cfg = tiny_config(n_layers=2, lr=3e-3, warmup_steps=4, grad_clip=0.5)
    data = batches(20, batch=4, seed=1)
    trainer = Trainer(cfg, make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]))
    state = trainer.init_state()
    save_pretrained(trainer.model(jax.device_get(state.params)), tmp_path / "hf", format="hf")

    jax_losses = []
    for batch in data:
        state, metrics = trainer.train_step(state, batch)
        jax_losses.append(float(metrics["loss"]))

    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32,
                                                          attn_implementation="eager")
    model.train()
    named = list(model.named_parameters())
    groups = [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
    assert len(groups[1]["params"]) == 2 * cfg.model.n_layers + 1  # the RMSNorm gains are not decayed
    opt = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: torch_lr_lambda(s, 4, 20, 0.1))
    torch_losses = []
    for batch in data:
        tokens = torch.tensor(batch["tokens"], dtype=torch.long)
        logits = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        sched.step()
        torch_losses.append(loss.item())

    assert torch_losses[-1] < torch_losses[0] - 0.5  # it learned: the comparison is not between two flat lines
    np.testing.assert_allclose(jax_losses, torch_losses, atol=1e-3)


@pytest.mark.e2e
def test_lr_and_grad_norm_metrics(init_params):
    cfg = tiny_config(lr=1e-2, warmup_steps=2)
    trainer = Trainer(cfg, make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]))
    state = trainer.init_state(init_params)
    batch = batches(1)[0]
    grads = jax.jit(jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        trainer.model(p)(batch["tokens"][:, :-1]), batch["tokens"][:, 1:]).mean()))(state.params)
    expected_norm = float(optax.tree.norm(grads))
    lrs = []
    for i in range(3):
        state, metrics = trainer.train_step(state, batch)
        lrs.append(float(metrics["lr"]))
        if i == 0:
            assert float(metrics["grad_norm"]) == pytest.approx(expected_norm, rel=1e-5)
    assert lrs == pytest.approx([0.0, 5e-3, 1e-2], rel=1e-6)

"""PPO on a policy and a value head, as Llama 2 ran it: rollouts, KL-penalised rewards, GAE, clipped objective.

Each iteration samples `ppo.batch_size` completions with the KV-cache sampler from the live policy weights
(`rollout.Sampler`), scores them with a reward callable, and builds per-token rewards: `-kl_coef * KL_t` on every
generated token (KL_t = log pi(y_t) - log pi_ref(y_t), the reference being the initial policy, or the base with
adapters off under LoRA) plus `whiten(logit(R))` on the last one. GAE turns them into advantages (whitened over the
batch's tokens), then `ppo.epochs` passes of shuffled minibatches take one AdamW step each on the clipped policy loss
plus `value_coef` x the clipped value loss. The value head reads the policy's trunk (`critic: shared`) or its own
copy of it (`separate`). Iteration i draws its prompts and sampling key from (seed, i), so a run resumed from a
checkpoint redoes exactly the iterations the killed one had not saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax import lora
from llama_jax.alignment.kl_control import next_kl_coef
from llama_jax.alignment.rewards_math import logit, whiten
from llama_jax.alignment.rollout import RewardFn, Rollout, Sampler, load_reward, read_prompts
from llama_jax.checkpoints import load_pretrained, save_pretrained
from llama_jax.checkpoints.manager import Checkpointer
from llama_jax.checkpoints.peft import save_peft
from llama_jax.config import Config, ConfigError, ExecutionConfig
from llama_jax.distributed import initialize
from llama_jax.inference.sampling import Sampling
from llama_jax.lora import LoRAParam
from llama_jax.model import Llama
from llama_jax.paths import AnyPath, as_path
from llama_jax.sharding import batch_sharding, make_mesh, state_shardings
from llama_jax.tokenizer import Tokenizer
from llama_jax.training.finetune import ADAPTER_DIR, stage_tokenizer
from llama_jax.training.loop import lock_run_dir, stop_signal_flag
from llama_jax.training.loss import chunked_token_entropy, chunked_token_losses
from llama_jax.training.metrics import MetricsLogger
from llama_jax.training.optim import make_optimizer
from llama_jax.training.step import TrainState, packed_features

log = logging.getLogger(__name__)
POLICY_DIR = "policy"
METRICS_FILE = "metrics.jsonl"  # one line per iteration, for scripts (TensorBoard has the same scalars)


# ---- the objective, on `[B, T]` per-target arrays whose `mask` marks the generated tokens -------------------------

def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_whiten(x: jax.Array, mask: jax.Array) -> jax.Array:
    """(x - mean) / std over the masked entries (zero elsewhere)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * jax.lax.rsqrt(var + 1e-8) * mask


def sequence_scores(raw: jax.Array, use_logit: bool, use_whiten: bool) -> jax.Array:
    """`whiten(logit(R))` over the batch (each step switchable), the paper's reward before the KL penalty."""
    score = logit(raw) if use_logit else raw.astype(jnp.float32)
    return whiten(score) if use_whiten else score


def token_rewards(scores: jax.Array, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, kl_coef: float
                  ) -> tuple[jax.Array, jax.Array]:
    """Per-token rewards `-kl_coef * KL_t` with each row's score added at its last generated token, and `KL_t`."""
    kl = (logp - ref_logp) * mask
    last = mask * (1.0 - jnp.pad(mask[:, 1:], ((0, 0), (0, 1))))
    return -kl_coef * kl + scores[:, None] * last, kl


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over each row's generated tokens (a contiguous run of `mask`); the value
    after the last one is 0. Returns (advantages, returns = advantages + values), zero outside the mask."""
    next_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
    next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1))) * next_mask
    deltas = rewards + gamma * next_values - values

    def back(carry: jax.Array, step: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        delta, keep = step
        advantage = delta + gamma * lam * carry * keep
        return advantage, advantage

    _, advantages = jax.lax.scan(back, jnp.zeros(rewards.shape[0], rewards.dtype), (deltas.T, next_mask.T),
                                 reverse=True)
    advantages = advantages.T * mask
    return advantages, (advantages + values) * mask


def clipped_policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, clip: float
                        ) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped surrogate `mean(max(-A r, -A clip(r, 1-e, 1+e)))` and the fraction of tokens it clipped."""
    ratio = jnp.exp(logp - old_logp)
    unclipped, clipped = -advantages * ratio, -advantages * jnp.clip(ratio, 1 - clip, 1 + clip)
    return masked_mean(jnp.maximum(unclipped, clipped), mask), masked_mean((clipped > unclipped).astype(jnp.float32),
                                                                           mask)


def clipped_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, clip: float
                       ) -> jax.Array:
    """`0.5 * mean(max((v - R)^2, (clip(v, v_old +- e) - R)^2))`."""
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    return 0.5 * masked_mean(jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


# ---- the model: policy + value head ------------------------------------------------------------------------------

class ValueParam(nnx.Param):
    """A value-head weight: trained even when LoRA freezes the base."""


class ValueHead(nnx.Module):
    """A scalar per position from final-norm features (zero-initialised: every value starts at 0)."""

    def __init__(self, dim: int):
        self.weight = ValueParam(jnp.zeros((dim,), jnp.float32), axes=("embed",))
        self.bias = ValueParam(jnp.zeros((), jnp.float32), axes=())

    def __call__(self, features: jax.Array) -> jax.Array:
        return jnp.einsum("BTD,D->BT", features.astype(jnp.float32), self.weight[...]) + self.bias[...]


class ActorCritic(nnx.Module):
    """The policy and a value head on its trunk (`critic=None`) or on a separate critic trunk."""

    def __init__(self, policy: Llama, critic: Llama | None):
        self.policy = policy
        self.critic = critic
        self.value_head = ValueHead(policy.cfg.dim)

    def __call__(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Log-probabilities of `batch["targets"]` and values, both `[B, T]`."""
        return self.policy_logprobs(batch), self.values(batch)

    def policy_logprobs(self, batch: dict[str, jax.Array]) -> jax.Array:
        return logprobs(self.policy, batch)

    def values(self, batch: dict[str, jax.Array]) -> jax.Array:
        trunk = self.policy if self.critic is None else self.critic
        return self.value_head(packed_features(trunk, batch))


def logprobs(model: Llama, batch: dict[str, jax.Array]) -> jax.Array:
    """`[B, T]` log-probabilities of the targets (chunked: the `[B, T, vocab]` logits never exist whole)."""
    return -chunked_token_losses(model.logits, packed_features(model, batch), batch["targets"])


def entropy(model: Llama, batch: dict[str, jax.Array]) -> jax.Array:
    """`[B, T]` entropies of the next-token distributions, chunked as `logprobs` is."""
    return chunked_token_entropy(model.logits, packed_features(model, batch))


# ---- the trainer --------------------------------------------------------------------------------------------------

def _copy(state: Any) -> Any:
    """Fresh device buffers with the same shardings (the train step donates what it updates)."""
    return jax.jit(lambda s: jax.tree.map(jnp.copy, s))(state)


class PpoTrainer:
    """Builds the actor-critic from an initial policy and runs PPO's jitted pieces on one mesh."""

    def __init__(self, cfg: Config, mesh: Mesh, policy: Llama):
        self.cfg, self.mesh, self.ppo = cfg, mesh, cfg.ppo
        self.lora = cfg.lora.rank > 0
        seed = cfg.train.seed
        # The reference: a plain Llama on the initial weights (under LoRA, the frozen base itself: no copy).
        plain, base = nnx.split(policy)
        self.reference_graphdef = plain
        base = jax.device_put(base, state_shardings(base, mesh))
        self.reference = base if self.lora else _copy(base)
        critic = None if self.ppo.critic == "shared" else nnx.merge(plain, _copy(base))
        if self.lora:
            policy = lora.attach(policy, cfg.lora, nnx.Rngs(seed + 1))
            if critic is not None:
                critic = lora.attach(critic, cfg.lora, nnx.Rngs(seed + 2))
        with jax.set_mesh(mesh):
            model = ActorCritic(policy, critic)
        self.trainable = nnx.Any(LoRAParam, ValueParam) if self.lora else nnx.Param
        self.graphdef, params, frozen = nnx.split(model, self.trainable, ...)
        params = jax.device_put(params, state_shardings(params, mesh))
        self.frozen = jax.device_put(frozen, state_shardings(frozen, mesh))
        optim = dataclasses.replace(cfg.optim, lr=self.ppo.lr, warmup_steps=0, min_lr_ratio=1.0)
        self.tx, _ = make_optimizer(optim, self.ppo.iterations)
        replicated = NamedSharding(mesh, PartitionSpec())
        self.state_sharding = TrainState(replicated, state_shardings(params, mesh),
                                         state_shardings(jax.eval_shape(self.tx.init, params), mesh))
        self._params = params
        self.sampler = Sampler(self.ppo.gather_weights)
        self._prepare = jax.jit(self._prepare_fn)
        self._train = jax.jit(self._train_step, donate_argnums=0,
                              out_shardings=(self.state_sharding, replicated))

    def _fresh_state(self, params: Any) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

    def init_state(self) -> TrainState:
        with jax.set_mesh(self.mesh):
            return jax.jit(self._fresh_state, out_shardings=self.state_sharding)(self._params)

    def abstract_state(self, execution: ExecutionConfig | None = None) -> tuple[Any, Any]:
        """(params, opt_state) as a checkpoint restore target (the layout never changes within a PPO run)."""
        shapes = jax.eval_shape(self._fresh_state, self._params)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                              self.state_sharding)
        return target.params, target.opt_state

    def model(self, params: Any) -> ActorCritic:
        return nnx.merge(self.graphdef, params, self.frozen)

    def _prepare_fn(self, params: Any, frozen: Any, reference: Any, batch: dict[str, jax.Array], raw: jax.Array,
                    kl_coef: jax.Array) -> dict[str, jax.Array]:
        """Old log-probs, values, reference log-probs, rewards, advantages and returns of a rollout batch."""
        p = self.ppo
        model = nnx.merge(self.graphdef, params, frozen)
        mask = batch["mask"]
        old_logp, values = model(batch)
        ref_logp = logprobs(nnx.merge(self.reference_graphdef, reference), batch)
        scores = sequence_scores(raw, p.logit_reward, p.whiten_reward)
        rewards, kl = token_rewards(scores, old_logp, ref_logp, mask, kl_coef)
        advantages, returns = gae(rewards, values * mask, mask, p.gamma, p.lam)
        return {"old_logp": old_logp, "ref_logp": ref_logp, "old_values": values * mask, "returns": returns,
                "advantages": masked_whiten(advantages, mask), "kl": jnp.sum(kl, axis=1),
                "entropy": masked_mean(entropy(model.policy, batch), mask), "score": scores}

    def prepare(self, state: TrainState, batch: dict[str, jax.Array], raw: jax.Array, kl_coef: float
                ) -> dict[str, jax.Array]:
        with jax.set_mesh(self.mesh):
            return self._prepare(state.params, self.frozen, self.reference, batch, raw, jnp.float32(kl_coef))

    def _train_step(self, state: TrainState, frozen: Any, batch: dict[str, jax.Array], kl_bound: jax.Array
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One AdamW step on a minibatch, refused (state unchanged, `kl_stop` 1) when the current policy's KL per
        reply to the reference on the minibatch's tokens exceeds `kl_bound`."""
        p, mask = self.ppo, batch["mask"]

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, ...]]:
            logp, values = nnx.merge(self.graphdef, params, frozen)(batch)
            policy_loss, clip_fraction = clipped_policy_loss(logp, batch["old_logp"], batch["advantages"], mask,
                                                             p.clip)
            value_loss = clipped_value_loss(values, batch["old_values"], batch["returns"], mask, p.value_clip)
            kl = jnp.mean(jnp.sum((logp - batch["ref_logp"]) * mask, axis=1))
            return policy_loss + p.value_coef * value_loss, (policy_loss, value_loss, clip_fraction, kl)

        (loss, (policy_loss, value_loss, clip_fraction, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        stop = jax.lax.stop_gradient(kl) > kl_bound
        stepped = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
        metrics = {"policy_loss": policy_loss, "value_loss": value_loss, "clip_fraction": clip_fraction,
                   "grad_norm": optax.tree.norm(grads), "kl_stop": stop.astype(jnp.float32)}
        return jax.tree.map(lambda old, new: jnp.where(stop, old, new), state, stepped), metrics

    def train_step(self, state: TrainState, batch: dict[str, jax.Array], kl_bound: float = float("inf")
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
        with jax.set_mesh(self.mesh):
            return self._train(state, self.frozen, batch, jnp.float32(kl_bound))

    def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.device_put(v, batch_sharding(self.mesh, v.shape)) for k, v in batch.items()}

    def rollout(self, state: TrainState, prompts: list[list[int]], eos_id: int, seed: int) -> Rollout:
        p = self.ppo
        return self.sampler(self.model(state.params).policy, prompts, p.max_new_tokens,
                            Sampling(p.temperature, p.top_p), eos_id, seed)


# ---- the loop -------------------------------------------------------------------------------------------------------

@dataclass
class PpoResult:
    run_dir: AnyPath
    iteration: int
    stopped: str
    metrics: dict[str, float]
    policy: Llama | None = None

    def report(self) -> str:
        shown = " ".join(f"{k} {v:.4g}" for k, v in self.metrics.items())
        return f"ppo run {self.run_dir}: stopped at iteration {self.iteration} ({self.stopped}); {shown}"


def iteration_prompts(n_prompts: int, batch: int, seed: int, iteration: int) -> np.ndarray:
    """The prompt indices of one iteration, a function of (seed, iteration) only (so resumes redo them exactly)."""
    return np.random.default_rng([seed, iteration]).choice(n_prompts, batch, replace=n_prompts < batch)


def ppo(cfg: Config, reward_fn: RewardFn | None = None) -> PpoResult:
    """Run (or resume) PPO as `cfg.ppo` describes from `ppo.init_from`, rewarded by `reward_fn` or `ppo.reward`."""
    p = cfg.ppo
    if not p.init_from:
        raise ConfigError("ppo.init_from is not set; give the SFT policy checkpoint to start from")
    if not p.prompts:
        raise ConfigError("ppo.prompts is not set; give JSONL prompts (messages ending with a user turn, or prompt)")
    initialize(cfg.train)
    with lock_run_dir(cfg):
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, init_from=p.init_from))
        tokenizer = stage_tokenizer(cfg)
        mesh = make_mesh(cfg.mesh)
        policy = load_pretrained(p.init_from, mesh, cfg.execution)
        cfg = dataclasses.replace(cfg, model=policy.cfg)
        reward_fn = reward_fn or load_reward(p.reward, tokenizer, mesh)
        prompts = read_prompts(p.prompts, tokenizer)
        return _run(cfg, PpoTrainer(cfg, mesh, policy), tokenizer, prompts, reward_fn)


def _run(cfg: Config, trainer: PpoTrainer, tokenizer: Tokenizer, prompts: list, reward_fn: RewardFn) -> PpoResult:
    p, run_dir = cfg.ppo, as_path(cfg.checkpoint.dir)
    main = jax.process_index() == 0
    with contextlib.ExitStack() as cleanup:
        ckpt = cleanup.enter_context(Checkpointer(run_dir, cfg.checkpoint))
        restored = ckpt.restore_latest(cfg.model, cfg.execution, trainer.abstract_state)
        kl_coef = p.kl_coef
        if restored is None:
            state, start = trainer.init_state(), 0
        else:
            start, kl_coef = restored.step, restored.data_state.get("kl_coef", kl_coef)
            step = jax.device_put(np.int32(restored.data_state["optimizer_steps"]), trainer.state_sharding.step)
            state = TrainState(step, restored.params, restored.opt_state)
            log.info("resumed PPO from %s iteration %d", run_dir, start)
        logger = MetricsLogger(run_dir, p.iterations, start, enabled=main)
        metrics: dict[str, float] = {}
        it, stopped = start, "iterations"
        with stop_signal_flag() as sigterm:
            while it < p.iterations:
                state, metrics = ppo_iteration(trainer, state, tokenizer, prompts, reward_fn, it, kl_coef)
                kl_coef = next_kl_coef(kl_coef, metrics["kl"], p.kl_target, p.batch_size, p.kl_horizon)
                it += 1
                logger.advance(1)
                logger.log(it, metrics, prefix="ppo")
                if main:
                    with (run_dir / METRICS_FILE).open("a") as f:
                        f.write(json.dumps({"iteration": it, **metrics}) + "\n")
                if ckpt.due(it) or it == p.iterations or sigterm.is_set():
                    ckpt.save(it, state.params, state.opt_state,
                              {"optimizer_steps": int(state.step), "kl_coef": kl_coef}, cfg)
                if sigterm.is_set():
                    stopped = "signal"
                    break
        ckpt.close()
        logger.close()
    policy = trainer.model(state.params).policy
    if main and stopped == "iterations":
        export_policy(policy, cfg, run_dir)
    return PpoResult(run_dir, it, stopped, metrics, policy)


def export_policy(policy: Llama, cfg: Config, run_dir: AnyPath) -> None:
    """The trained policy beside the checkpoints: its adapter in PEFT format (LoRA) or the whole model (orbax)."""
    if cfg.lora.rank > 0:
        save_peft(policy, cfg.lora, run_dir / ADAPTER_DIR)
    else:
        save_pretrained(policy, run_dir / POLICY_DIR, format="orbax", overwrite=True)


def ppo_iteration(trainer: PpoTrainer, state: TrainState, tokenizer: Tokenizer, prompts: list,
                  reward_fn: Callable[..., Any], iteration: int, kl_coef: float
                  ) -> tuple[TrainState, dict[str, float]]:
    """One PPO iteration at KL coefficient `kl_coef`: rollouts, rewards, advantages, then `epochs` x minibatch
    updates; returns its metrics.

    With `ppo.max_kl`, the updates stop early as in Spinning Up's PPO (`if kl > target_kl: break` before each
    gradient step; Achiam 2018), the KL being the current policy's to the reference, per reply, on the next
    minibatch's tokens: that minibatch's update is refused and the iteration's remaining ones are skipped. The first
    update is never refused (on the rollout's own samples it would refuse every later iteration too, freezing the
    policy; the raised penalty of an adaptive `kl_coef` is what brings the KL back down)."""
    p, seed = trainer.ppo, trainer.cfg.train.seed
    chosen = [prompts[i].ids for i in iteration_prompts(len(prompts), p.batch_size, seed, iteration)]
    rollout = trainer.rollout(state, chosen, tokenizer.eos_id, seed=seed * 1_000_003 + iteration)
    raw = np.asarray(reward_fn(rollout.prompts, rollout.completions, rollout.mask), np.float32)
    batch = rollout.sequences()
    prepared = jax.device_get(trainer.prepare(state, trainer.put(batch), jnp.asarray(raw), kl_coef))
    rows = {**batch, **{k: prepared[k] for k in ("old_logp", "ref_logp", "old_values", "returns", "advantages")}}
    order = np.random.default_rng([seed, iteration, 1])
    start, steps = time.perf_counter(), []
    minibatches = [perm[first:first + p.minibatch_size] for perm in (order.permutation(p.batch_size)
                                                                      for _ in range(p.epochs))
                   for first in range(0, p.batch_size, p.minibatch_size)]
    for take in minibatches:
        bound = float("inf") if not steps or p.max_kl is None else p.max_kl
        state, step_metrics = trainer.train_step(state, trainer.put({k: v[take] for k, v in rows.items()}), bound)
        steps.append(step_metrics)
        if p.max_kl is not None and float(step_metrics["kl_stop"]):
            break
    steps = jax.device_get(steps)
    seconds = time.perf_counter() - start
    mean = {k: float(np.mean([s[k] for s in steps])) for k in steps[0] if k != "kl_stop"}
    return state, {"reward": float(raw.mean()), "score": float(np.mean(prepared["score"])),
                   "kl": float(np.mean(prepared["kl"])), "kl_coef": kl_coef, "entropy": float(prepared["entropy"]),
                   **mean, "updates": float(len(steps) - sum(s["kl_stop"] for s in steps)),
                   "response_length": float(rollout.mask.sum(1).mean()),
                   "rollout_tokens_per_s": rollout.tokens_per_s,
                   "train_tokens_per_s": len(steps) * p.minibatch_size * batch["tokens"].shape[1] / max(seconds, 1e-9)}

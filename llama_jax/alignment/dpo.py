"""Direct preference optimisation (Rafailov et al. 2023) and its IPO and conservative (label-smoothed) variants.

With h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)) summed over the reply tokens, DPO minimises
`-log σ(β h)`, conservative DPO `-(1−ε) log σ(β h) − ε log σ(−β h)` and IPO `(h − 1/(2β))²`. The implicit rewards
are `β (log π − log π_ref)` of each side. The reference model is the starting checkpoint `finetune.init_from` (with
LoRA, the base with adapters off: the same weights); its log-probabilities of every pair are computed once before
training and cached in the run directory (`dpo.reference_cache`), so training never holds it and a resumed run
reads the cache. The cache records a fingerprint of the data, the tokenizer and the reference, and is recomputed
when any differs.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_jax.alignment.preferences import (
    SIDES,
    build_preference_data,
    on_both_sides,
    pair_rows,
    preference_fingerprint,
    preference_metrics,
    read_pairs,
)
from llama_jax.alignment.sequences import completion_logps, logps_of_rows, per_sequence
from llama_jax.checkpoints import load_pretrained
from llama_jax.config import Config, DpoConfig
from llama_jax.data.pipeline import fingerprint_of
from llama_jax.model import Llama
from llama_jax.paths import AnyPath, as_path
from llama_jax.tokenizer import Tokenizer
from llama_jax.training.finetune import epochs_to_steps, export_adapter, run_stage
from llama_jax.training.loop import TrainResult, run_training
from llama_jax.training.step import Batch, Objective, Trainer

log = logging.getLogger(__name__)
REFERENCE_CACHE = "reference_logps.npz"
REFERENCE_FIELDS = ("ref_chosen", "ref_rejected")


def dpo_losses(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array,
               beta: float = 0.1, variant: str = "dpo", label_smoothing: float = 0.0
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair losses and the implicit rewards of the chosen and rejected replies, from summed log-probs."""
    chosen = policy_chosen.astype(jnp.float32) - ref_chosen.astype(jnp.float32)
    rejected = policy_rejected.astype(jnp.float32) - ref_rejected.astype(jnp.float32)
    h = chosen - rejected
    if variant == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif variant == "dpo":
        losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    else:
        raise ValueError(f"DPO variant '{variant}' is not dpo or ipo")
    return losses, beta * chosen, beta * rejected


def pair_logps(model: Llama, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Summed reply log-probs of the chosen and the rejected sides, from one forward pass over both."""
    return on_both_sides(functools.partial(completion_logps, model), batch, "ids", "learn")


def dpo_objective(cfg: DpoConfig) -> Objective:
    """The DPO/IPO loss over pair batches carrying the cached reference log-probs; per-pair metrics: reward
    accuracy (chosen's implicit reward higher), chosen / rejected implicit rewards and their margin."""
    def loss(model: Llama, batch: Batch) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        chosen_logps, rejected_logps = pair_logps(model, batch)
        losses, chosen, rejected = dpo_losses(chosen_logps, rejected_logps, batch["ref_chosen"],
                                              batch["ref_rejected"], cfg.beta, cfg.variant, cfg.label_smoothing)
        return jnp.sum(losses), jnp.float32(losses.size), preference_metrics(chosen, rejected)

    return Objective(loss)


def reference_logps(model: Llama, rows: dict[str, np.ndarray], mesh: Mesh | None = None) -> dict[str, np.ndarray]:
    """`ref_chosen` and `ref_rejected` `[n]`: the summed reply log-probs of every pair under `model`."""
    return {field: per_sequence(logps_of_rows, model, {k: rows[f"{side}_{k}"] for k in ("ids", "learn", "length")},
                                mesh)
            for field, side in zip(REFERENCE_FIELDS, SIDES)}


def cache_path(cfg: Config) -> AnyPath:
    return as_path(cfg.dpo.reference_cache or as_path(cfg.checkpoint.dir) / REFERENCE_CACHE)


def cached_reference(cfg: Config, rows: dict[str, np.ndarray], mesh: Mesh, fingerprint: str) -> dict[str, np.ndarray]:
    """The reference log-probs of `rows`: read from the cache when its fingerprint matches, else computed with the
    reference model (loaded, used, released) and written there by process 0."""
    path = cache_path(cfg)
    if path.exists():
        with path.open("rb") as f:
            stored = dict(np.load(f))
        if str(stored.get("fingerprint")) == fingerprint:
            return {k: stored[k] for k in REFERENCE_FIELDS}
        log.warning("reference cache %s was computed for other data or another reference; recomputing", path)
    reference = load_pretrained(cfg.finetune.init_from, mesh, cfg.execution, max_seq_len=cfg.model.max_seq_len)
    values = reference_logps(reference, rows, mesh)
    del reference
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            np.savez(f, fingerprint=np.asarray(fingerprint), **values)
    return values


@dataclass
class DpoResult:
    training: TrainResult
    reference_cache: str

    def report(self) -> str:
        return f"{self.training.report()}\nreference log-probs cached in {self.reference_cache}"


def train_dpo(cfg: Config) -> DpoResult:
    """DPO (or IPO / conservative DPO, `dpo.variant`) from `finetune.init_from` on the pairs in `finetune.train`,
    resuming a run in `checkpoint.dir`; full or LoRA (`lora.rank`), metrics and checkpoints as fine-tuning's."""
    return run_stage(cfg, _train_dpo)


def _train_dpo(cfg: Config, mesh: Mesh, tokenizer: Tokenizer) -> DpoResult:
    pairs, issues = read_pairs(cfg.finetune.train, tokenizer, cfg.data.seq_len, cfg.finetune.bad_records)
    rows = pair_rows(pairs, cfg.data.seq_len)
    fingerprint = fingerprint_of("reference", cfg.finetune.init_from, preference_fingerprint(cfg, tokenizer),
                                 len(pairs))
    rows |= cached_reference(cfg, rows, mesh, fingerprint)
    data = build_preference_data(cfg, tokenizer, mesh, rows, issues, fingerprint)
    epochs_to_steps(cfg, data.steps_per_epoch)
    trainer = Trainer(cfg, mesh, dpo_objective(cfg.dpo))
    result = run_training(cfg, trainer, data.train, None, tokenizer, cfg.finetune.init_from)
    export_adapter(cfg, trainer, result)
    return DpoResult(result, str(cache_path(cfg)))

"""What the host does after a step whose loss or gradient norm was NaN/Inf (`train.nonfinite`).

The jitted step has already dropped such an update (parameters and optimizer state stay as they were), so this
only decides whether the run goes on: `halt` stops at the first one; `skip` goes on and stops after
`train.max_nonfinite_skips` in a row. Stopping raises `TrainingHalted` before anything newer is saved.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from llama_jax.config import TrainConfig
from llama_jax.errors import TrainingHalted, warn

log = logging.getLogger(__name__)
WATCHED = ("loss", "grad_norm")


class NonFiniteGuard:
    """Reads fetched step metrics in order, counts dropped steps, and raises when the policy says stop."""

    def __init__(self, train: TrainConfig):
        self.policy, self.max_in_a_row = train.nonfinite, train.max_nonfinite_skips
        self.skipped = 0
        self.in_a_row = 0

    def check(self, fetched: Sequence[dict[str, Any]], last_step: int, last_saved: int | None) -> None:
        """`fetched` are the metrics of the steps ending at `last_step` (1-based step numbers after the update)."""
        first = last_step - len(fetched) + 1
        for offset, metrics in enumerate(fetched):
            if bool(metrics["finite"]):
                self.in_a_row = 0
                continue
            step = first + offset
            bad = ", ".join(f"{name} is {float(metrics[name])}" for name in WATCHED
                            if not np.isfinite(metrics[name])) or "a non-finite value"
            kept = f"the last checkpoint (step {last_saved}) is kept" if last_saved is not None else "nothing was saved"
            fix = "lower optim.lr, raise optim.warmup_steps or optim.grad_clip, or check the data"
            if self.policy == "halt":
                raise TrainingHalted(f"step {step}: {bad}; halted (train.nonfinite=halt), {kept}; {fix}, or set "
                                     "train.nonfinite=skip")
            self.skipped += 1
            self.in_a_row += 1
            if self.in_a_row >= self.max_in_a_row:
                raise TrainingHalted(f"step {step}: {bad}, {self.in_a_row} steps in a row were skipped "
                                     f"(train.max_nonfinite_skips={self.max_in_a_row}); halted, {kept}; {fix}")
            warn(log, f"step {step}: {bad}; update skipped ({self.skipped} so far, train.nonfinite=skip)")


def finite_mean(fetched: Sequence[dict[str, Any]], name: str) -> float:
    """Mean of `name` over the steps whose update was applied (NaN if none was)."""
    values = [float(m[name]) for m in fetched if bool(m["finite"])]
    return float(np.mean(values)) if values else float("nan")

"""Training metrics: throughput and MFU, a console progress bar, TensorBoard events and a loss-curve PNG.

MFU = achieved model FLOPs/s (`LlamaConfig.flops_per_token` x tokens/s) over the devices' peak. The peak per device
comes from the chip table in `llama_jax.chips` (override with `train.peak_flops_per_device`); on CPU, where no table
applies, a matmul in the compute dtype is timed once (bf16 runs 5x faster than float32 there with AMX).
"""

from __future__ import annotations

import functools
import io
import math
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import tqdm

from llama_jax.chips import chip_for_device_kind
from llama_jax.einsum import einsum
from llama_jax.paths import AnyPath, PathLike, as_path, is_remote


@functools.cache
def measured_matmul_flops(n: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of a jitted n x n matmul on the first device (best of `repeats`), on random data: constant inputs can
    run faster than real ones. It multiplies as the model does (`llama_jax.einsum`)."""
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    matmul = jax.jit(lambda a: einsum("ij,jk->ik", a, a))
    matmul(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops_per_device(override: float | None = None, dtype: str = "float32") -> float:
    """Peak FLOP/s of one device: the override, the table entry for its kind, or a measured `dtype` matmul on CPU."""
    if override:
        return float(override)
    device = jax.devices()[0]
    chip = chip_for_device_kind(device.device_kind)
    if chip is not None:
        return chip.peak_flops
    if device.platform == "cpu":
        return measured_matmul_flops(dtype=dtype) / jax.local_device_count()
    raise ValueError(f"no peak FLOP/s known for device kind '{device.device_kind}'; "
                     "set train.peak_flops_per_device")


class Throughput:
    """Tokens/s and MFU between consecutive `update` calls (each one after a blocking read of a step result)."""

    def __init__(self, flops_per_token: float, peak_flops_total: float):
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_total
        self._time = time.perf_counter()
        self._tokens = 0.0

    def add(self, tokens: float) -> None:
        self._tokens += tokens

    def reset(self) -> None:
        """Start a new window, discarding time spent on compilation, evaluation or checkpointing."""
        self._time, self._tokens = time.perf_counter(), 0.0

    def update(self) -> tuple[float, float]:
        """(tokens/s, MFU) since the previous update, then restart the window."""
        now = time.perf_counter()
        rate = self._tokens / max(now - self._time, 1e-9)
        self._time, self._tokens = now, 0.0
        return rate, rate * self.flops_per_token / self.peak


class MetricsLogger:
    """Console progress bar, TensorBoard scalars (process 0 only) and history for the loss-curve plot.

    For a remote run dir (gs://...) the events are written to a local temporary directory and uploaded to
    `<run_dir>/tensorboard` by `close()`: tensorboardX writes gs:// only through google-cloud-storage, which this
    project does not install, and rewrites the whole file on every flush.
    """

    def __init__(self, run_dir: PathLike, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.run_dir = as_path(run_dir)
        self.enabled = enabled
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                              disable=not enabled)
        self._writer = None
        self._staging: Path | None = None
        if enabled:
            from tensorboardX import SummaryWriter
            if is_remote(self.run_dir):
                self._staging = Path(tempfile.mkdtemp(prefix="llama_jax_tensorboard_"))
            self._writer = SummaryWriter(str(self._staging or self.run_dir / "tensorboard"))

    def advance(self, steps: int) -> None:
        self._bar.update(steps)

    def log(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        """Record scalars at `step` in TensorBoard and the history; print one line above the progress bar."""
        for name, value in scalars.items():
            self.history.setdefault(f"{prefix}/{name}", []).append((step, value))
            if self._writer is not None:
                self._writer.add_scalar(f"{prefix}/{name}", value, step)
        if self.enabled:
            self._bar.write(f"{prefix} step {step}: " + " ".join(f"{k} {_fmt(v)}" for k, v in scalars.items()))
            if prefix == "train":
                shown = {"loss": f"{scalars.get('loss', math.nan):.3f}"}
                if "loss_scale" in scalars:
                    shown["scale"] = _fmt(scalars["loss_scale"])
                self._bar.set_postfix(shown)

    def plot(self, path: PathLike | None = None) -> AnyPath | None:
        """Write the train (and validation) loss curves as a PNG; returns its path."""
        if not self.enabled or "train/loss" not in self.history:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = as_path(path or self.run_dir / "loss.png")
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in (("train/loss", "train"), ("eval/loss", "validation")):
            if key in self.history:
                steps, values = zip(*self.history[key])
                ax.plot(steps, values, label=label, marker="o" if key.startswith("eval") else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png.getvalue())
        return path

    def close(self) -> None:
        self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._staging is not None:
            events = self.run_dir / "tensorboard"
            events.mkdir(parents=True, exist_ok=True)
            for file in self._staging.iterdir():
                (events / file.name).write_bytes(file.read_bytes())
            shutil.rmtree(self._staging)
            self._staging = None


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"

"""Pretraining loop: config -> mesh, tokenizer, data, model, optimizer -> steps, metrics, validation, checkpoints.

A run lives in `checkpoint.dir`: tokenizer, checkpoints, TensorBoard events and the loss curve. Starting a run whose
directory already holds checkpoints resumes from the newest readable one (parameters, optimizer, step and data
position), so a killed or preempted job continues where it stopped. SIGTERM or Ctrl-C saves a checkpoint at the next
step boundary (with several processes, at the next multiple of `train.stop_check_every`) and returns normally. The host
blocks on a step result at least every 16 steps: on CPU devices more than ~50 queued collective programs deadlock,
and it bounds how far the progress bar runs ahead.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from llama_jax.checkpoints import load_pretrained
from llama_jax.checkpoints.lock import RunLock
from llama_jax.checkpoints.manager import Checkpointer
from llama_jax.config import Config, ConfigError, ExecutionConfig
from llama_jax.data import build_train_data, build_validation_data, provision_tokenizer
from llama_jax.distributed import initialize
from llama_jax.paths import AnyPath, as_path
from llama_jax.sharding import check_model_fits, make_mesh
from llama_jax.tokenizer import Tokenizer
from llama_jax.training.evaluate import EvalResult, evaluate
from llama_jax.training.metrics import MetricsLogger, Throughput, peak_flops_per_device
from llama_jax.training.nonfinite import NonFiniteGuard, finite_mean
from llama_jax.training.step import Trainer, TrainState

log = logging.getLogger(__name__)
SYNC_EVERY = 16
LOSS_SCALE_METRICS = ("loss_scale", "overflow_skips")  # logged as of the last step when optim.loss_scale is on
STEP_METRICS = ("loss", "grad_norm", "lr", "tokens", "finite", "overflow", *LOSS_SCALE_METRICS)  # the rest come
# from the objective


@dataclass
class TrainResult:
    run_dir: AnyPath
    step: int
    stopped: str  # "steps", "time" or "signal"
    train_loss: float | None
    validation: EvalResult | None
    sample: str | None
    state: TrainState | None = None
    tokens_per_s: float | None = None  # the last logged training throughput

    def report(self) -> str:
        """Human-readable summary: where the run stopped, the final validation metrics and the sample."""
        lines = [f"run {self.run_dir}: stopped at step {self.step} ({self.stopped})"
                 + (f", last train loss {self.train_loss:.4f}" if self.train_loss is not None else "")]
        if self.validation is not None:
            lines.append(f"validation: {self.validation.report()}")
        if self.sample is not None:
            lines += ["sample:", self.sample]
        return "\n".join(lines)


@contextlib.contextmanager
def stop_signal_flag() -> Iterator[threading.Event]:
    """An event set by SIGTERM (TPU preemption) or Ctrl-C (SIGINT) while the block runs, so the run saves and stops
    at the next step; the previous handlers are restored after. A second Ctrl-C ends the process at once (a
    KeyboardInterrupt raised mid-step left the process hanging with Orbax's and grain's threads alive)."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def stop(signum: int, _frame: object) -> None:
        event.set()
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield event
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop_reason(step: int, every: int, sigterm: threading.Event, deadline: float | None) -> str | None:
    """"signal" or "time" when the run must stop after `step`, agreed by every process, else None.

    Multi-process runs compare flags (one small all-gather) only every `every` steps, so hosts never wait on each
    other in between; every process checks at the same steps, so all stop at the same step and save once.
    """
    multi = jax.process_count() > 1
    if multi and step % every:
        return None
    flags = np.array([sigterm.is_set(), deadline is not None and time.monotonic() > deadline])
    if multi:
        flags = np.any(multihost_utils.process_allgather(flags), axis=0)
    return "signal" if flags[0] else "time" if flags[1] else None


def _load_init(cfg: Config, trainer: Trainer, init_from: str) -> Any:
    """The model at `init_from` (any checkpoint format), checked against the model section."""
    model = load_pretrained(init_from, trainer.mesh, cfg.execution, max_seq_len=cfg.model.max_seq_len)
    differences = model.cfg.shape_differences(cfg.model)
    if differences:
        raise ConfigError(f"init_from '{init_from}' does not match the model section (checkpoint vs config: "
                          f"{'; '.join(differences)}); set the model fields to the checkpoint's")
    return model


def _initial_state(cfg: Config, trainer: Trainer, ckpt: Checkpointer, data: Any, init_from: str | None) -> TrainState:
    """Resume from the newest readable checkpoint; else start from `init_from` or a fresh init.

    Under LoRA the frozen base is read from `init_from` every time: checkpoints hold only the adapters.
    """
    def abstract_state(execution: ExecutionConfig) -> tuple[Any, Any]:
        state = trainer.abstract_state(execution)
        return state.params, state.opt_state

    base = None
    if trainer.lora:
        if not init_from:
            raise ConfigError("LoRA (lora.rank > 0) trains adapters on a pretrained model; set finetune.init_from")
        base = _load_init(cfg, trainer, init_from)
        trainer.set_base(base)
    restored = ckpt.restore_latest(cfg.model, cfg.execution, abstract_state)
    if restored is not None:
        data.restore(restored.data_state)
        log.info("resumed from %s step %d", ckpt.directory, restored.step)
        step = jax.device_put(np.int32(restored.step), trainer.state_sharding.step)
        return TrainState(step, restored.params, restored.opt_state)
    if init_from:
        return trainer.init_state(base if base is not None else _load_init(cfg, trainer, init_from))
    return trainer.init_state()


def _sample(cfg: Config, trainer: Trainer, params: Any, tokenizer: Tokenizer) -> str | None:
    if cfg.train.sample_tokens <= 0:
        return None
    from llama_jax.inference.generate import generate

    prompt = tokenizer.encode(cfg.train.sample_prompt, bos=True)
    out = generate(trainer.model(params), [prompt], max_new_tokens=cfg.train.sample_tokens,
                   temperature=cfg.train.sample_temperature, eos_id=tokenizer.eos_id, seed=cfg.train.seed,
                   mesh=trainer.mesh)
    return tokenizer.decode(prompt + out[0])


def check_train(cfg: Config) -> None:
    if cfg.train.stop_check_every <= 0:
        raise ConfigError(f"train.stop_check_every must be positive, got {cfg.train.stop_check_every}")


def lock_run_dir(cfg: Config) -> RunLock:
    """The run directory's lock against a second writer, held for a whole run (see `checkpoints.lock`); taken
    before anything is written there (a `checkpoint.dir` that is a file fails here, before data is prepared)."""
    return RunLock(cfg.checkpoint.dir, owner=jax.process_index() == 0)


def train(cfg: Config) -> TrainResult:
    """Run (or resume) the pretraining described by `cfg` until `train.steps`, `train.max_minutes` or SIGTERM."""
    check_train(cfg)
    initialize(cfg.train)
    with lock_run_dir(cfg):
        run_dir = as_path(cfg.checkpoint.dir)
        mesh = make_mesh(cfg.mesh)
        check_model_fits(cfg.model, mesh)
        trainer = Trainer(cfg, mesh)  # checks the settings before data is prepared
        tokenizer = provision_tokenizer(cfg, run_dir)
        data = build_train_data(cfg, tokenizer, mesh=mesh)
        validation = build_validation_data(cfg, tokenizer, mesh=mesh)
        return run_training(cfg, trainer, data, validation, tokenizer, cfg.train.init_from)


def run_training(cfg: Config, trainer: Trainer, data: Any, validation: Any, tokenizer: Tokenizer,
                 init_from: str | None) -> TrainResult:
    """The training loop shared by pretraining and fine-tuning (callers hold `lock_run_dir`): resume or initialise
    (from `init_from`), then step `data` with metrics, periodic validation, checkpoints, SIGTERM and time limits;
    returns the summary."""
    with contextlib.ExitStack() as cleanup:
        return _run(cfg, trainer, data, validation, tokenizer, init_from, cleanup)


def _run(cfg: Config, trainer: Trainer, data: Any, validation: Any, tokenizer: Tokenizer, init_from: str | None,
         cleanup: contextlib.ExitStack) -> TrainResult:
    t, mesh = cfg.train, trainer.mesh
    run_dir = as_path(cfg.checkpoint.dir)
    ckpt = cleanup.enter_context(Checkpointer(run_dir, cfg.checkpoint))  # an error still finishes an async save
    state = _initial_state(cfg, trainer, ckpt, data, init_from)
    step = first_step = int(state.step)

    main = jax.process_index() == 0
    logger = MetricsLogger(run_dir, t.steps, step, enabled=main)
    tokens_per_step = t.batch_size * cfg.data.seq_len
    peak = peak_flops_per_device(t.peak_flops_per_device, cfg.execution.dtype) * jax.device_count()
    speed = Throughput(cfg.model.flops_per_token(cfg.data.seq_len), peak)
    deadline = time.monotonic() + t.max_minutes * 60 if t.max_minutes else None
    pending: list[dict[str, jax.Array]] = []
    train_loss, stopped, throughput = None, "steps", None
    guard = NonFiniteGuard(t)

    def flush() -> list[dict[str, Any]]:
        """Fetch the pending steps' metrics and apply train.nonfinite to them (always before a save)."""
        fetched = jax.device_get(pending)
        pending.clear()
        guard.check(fetched, step, ckpt.latest_step())
        return fetched

    def run_eval(at: int, max_batches: int | None) -> EvalResult | None:
        if validation is None:
            return None
        result = evaluate(trainer.model(state.params), validation, mesh, max_batches)
        logger.log(at, result.scalars(), prefix="eval")
        return result

    with stop_signal_flag() as sigterm:
        while step < t.steps:
            state, metrics = trainer.train_step(state, next(data))
            step += 1
            pending.append(metrics)
            if step == first_step + 1:
                jax.block_until_ready(metrics)
                speed.reset()  # the first step's time is mostly compilation
            else:
                speed.add(tokens_per_step)
            logger.advance(1)
            if step % t.log_every == 0 or step % SYNC_EVERY == 0 or step == t.steps or ckpt.due(step):
                fetched = flush()
                train_loss = finite_mean(fetched, "loss")
                if step % t.log_every == 0 or step == t.steps:
                    rate, mfu = speed.update()
                    throughput = rate
                    last = fetched[-1]
                    objective = {k: finite_mean(fetched, k) for k in last if k not in STEP_METRICS}
                    logger.log(step, {"loss": train_loss, "lr": float(last["lr"]),
                                      "grad_norm": float(last["grad_norm"]), "tokens_per_s": rate, "mfu": mfu,
                                      "nonfinite_skips": guard.skipped, **objective,
                                      **{k: float(last[k]) for k in LOSS_SCALE_METRICS if k in last}})
                    logger.log(step, data.metrics(), prefix="data")
            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                run_eval(step, t.eval_batches)
                speed.reset()
            if ckpt.due(step):
                ckpt.save(step, state.params, state.opt_state, data.state(), cfg)
                speed.reset()
            if reason := _stop_reason(step, t.stop_check_every, sigterm, deadline):
                stopped = reason
                break
        flush()
        ckpt.save(step, state.params, state.opt_state, data.state(), cfg)
        ckpt.close()
        data.close()

    validation_result = run_eval(step, None) if stopped != "signal" else None
    sample = _sample(cfg, trainer, state.params, tokenizer) if stopped != "signal" else None
    logger.plot()
    logger.close()
    return TrainResult(run_dir, step, stopped, train_loss, validation_result, sample, state, throughput)

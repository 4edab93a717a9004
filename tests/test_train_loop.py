"""The pretraining loop end to end: CLI + SIGTERM, bit-exact resume after SIGKILL, eval CLI, the demo config."""

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from llama_jax import load_pretrained
from llama_jax.cli import main
from llama_jax.config import load_config
from llama_jax.training import step as step_module
from llama_jax.training.evaluate import evaluate_checkpoint
from llama_jax.training.loop import train
from sigkill import killed_at_step

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "configs" / "tiny_ci.yaml"


@pytest.fixture
def overrides(tmp_path, tfds_dir, tokenizer_1k):
    """tiny_ci.yaml offline, with a ready tokenizer (no tokenizer training) and everything written under tmp."""
    return [f"data.data_dir={tfds_dir}", f"data.tokenizer={tokenizer_1k}", "model.vocab_size=1000",
            f"data.cache_dir={tmp_path / 'cache'}", f"checkpoint.dir={tmp_path / 'run'}"]


def record_batches(monkeypatch) -> list[tuple[int, str]]:
    """Patch the train step to log (step about to run, hash of its batch)."""
    seen: list[tuple[int, str]] = []
    original = step_module.Trainer.train_step

    def spy(self, state, batch):
        seen.append((int(state.step), hashlib.sha1(np.asarray(batch["tokens"]).tobytes()).hexdigest()))
        return original(self, state, batch)

    monkeypatch.setattr(step_module.Trainer, "train_step", spy)
    return seen


@pytest.mark.e2e
def test_cli_train_logs_metrics_and_sigterm_saves_then_exits_cleanly(overrides, tmp_path):
    cmd = [sys.executable, "-m", "llama_jax", "train", "--config", str(TINY), *overrides,
           "train.steps=1000", "train.log_every=2", "checkpoint.every=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "train step 12:" in line:
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, "".join(lines)
    out = "".join(lines)
    logged = {int(s): dict(re.findall(r"(\w+) ([-\d.e+]+)", rest))
              for s, rest in re.findall(r"train step (\d+): (.*)", out)}
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(logged[4])
    assert float(logged[12]["loss"]) < float(logged[2]["loss"]) - 0.3
    assert 0 < float(logged[12]["mfu"]) < 1 and float(logged[12]["tokens_per_s"]) > 0
    stop = int(re.search(r"stopped at step (\d+) \(signal\)", out).group(1))
    assert 12 <= stop < 1000
    assert (tmp_path / "run" / str(stop) / "params").is_dir()  # the preemption checkpoint
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


# steps 5-6 run after checkpoint 4: after the kill they must be redone identically
KILLED_RUN = killed_at_step(6, "llama_jax.training.loop:train")


def kill_at_step_6_then_resume(config: Path, resumed: list[str], seen: list, straight_batches: dict, straight_dir: Path,
                               resumed_dir: Path) -> None:
    """Run `config` + `resumed` overrides in a subprocess SIGKILLed at step 6 (checkpoint at 4), resume it here to
    step 8, and check it ran the uninterrupted run's batches and ends with bit-identical parameters."""
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(config), *resumed], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in resumed_dir.iterdir() if p.name.isdigit()) == ["4"]
    seen.clear()
    train(load_config(config, resumed))
    assert [s for s, _ in seen] == [4, 5, 6, 7]
    assert all(straight_batches[s] == h for s, h in seen)  # the same batches, in the same order
    a = nnx.state(load_pretrained(straight_dir))
    b = nnx.state(load_pretrained(resumed_dir))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.e2e
def test_sigkill_then_resume_is_bit_identical(overrides, tmp_path, monkeypatch, tfds_dir, tokenizer_1k):
    common = [*overrides[:-1], "train.steps=8", "checkpoint.every=4", "checkpoint.async_save=false",
              "train.sample_tokens=8"]
    straight = common + [f"checkpoint.dir={tmp_path / 'straight'}"]
    resumed = common + [f"checkpoint.dir={tmp_path / 'resumed'}"]

    seen = record_batches(monkeypatch)
    result = train(load_config(TINY, straight))
    straight_batches = dict(seen)
    assert result.step == 8 and result.stopped == "steps"
    assert result.sample.startswith("ROMEO:") and 0 < result.validation.bits_per_byte < 10
    assert (tmp_path / "straight" / "loss.png").stat().st_size > 0

    kill_at_step_6_then_resume(TINY, resumed, seen, straight_batches, tmp_path / "straight", tmp_path / "resumed")

    evaluated = evaluate_checkpoint(tmp_path / "straight", "tiny_shakespeare", tokenizer_1k, data_dir=str(tfds_dir),
                                    seq_len=64, batch_size=8, overrides=[f"data.cache_dir={tmp_path / 'cache'}"])
    assert evaluated.loss == pytest.approx(result.validation.loss, rel=1e-5)
    assert evaluated.bits_per_byte == pytest.approx(result.validation.bits_per_byte, rel=1e-5)


@pytest.mark.e2e
def test_demo_config_runs_shortened(tmp_path, tfds_dir, tokenizer_1k):
    cfg = load_config(REPO / "experiments" / "configs" / "shakespeare.yaml", [
        f"data.data_dir={tfds_dir}", f"data.tokenizer={tokenizer_1k}", f"data.cache_dir={tmp_path / 'cache'}",
        f"checkpoint.dir={tmp_path / 'run'}", "train.steps=2", "train.batch_size=8", "train.eval_every=0",
        "train.sample_tokens=4"])
    assert cfg.model.hidden_dim == 704 and cfg.model.num_params() > 3_000_000
    result = train(cfg)
    assert result.step == 2 and result.validation.tokens > 10_000 and result.sample.startswith("ROMEO:")


def test_bad_config_is_one_line_error(tmp_path, capsys):
    assert main(["train", "--config", str(TINY), "optim.lrr=1", f"checkpoint.dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == "error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)\n"
    assert not (tmp_path / "run").exists()


def test_ctrl_c_stops_like_sigterm_and_a_second_one_ends_the_process():
    from llama_jax.training.loop import stop_signal_flag
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop_signal_flag() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the run saves and stops at the next step
        time.sleep(0.05)
        assert stop.is_set() and signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    with stop_signal_flag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.is_set() and signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL

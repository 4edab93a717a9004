"""Fault injection: a SIGKILL during an async checkpoint write and a full disk while saving cost at most the step
being written (the previous one stays byte-identical and resumes); a damaged token cache is detected and rebuilt; a
killed process ends its peer with one line."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_errors import files  # noqa: F401 - the tokenizer/corpus/config fixture, built in tmp

from llama_jax.checkpoints.manager import Checkpointer
from llama_jax.config import CheckpointConfig, Config, LlamaConfig, MeshConfig
from llama_jax.data.tokenized import token_stream
from llama_jax.sharding import make_mesh
from llama_jax.tokenizer import Tokenizer
from llama_jax.training.step import Trainer

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(dim=32, n_layers=1, n_heads=2, vocab_size=300, multiple_of=16, max_seq_len=16)

# Saves step 1 and waits, then starts step 2 asynchronously; FAULT decides how step 2 fails.
CHILD = textwrap.dedent("""
    import os, resource, signal, sys, time
    from llama_jax.checkpoints.manager import Checkpointer
    from llama_jax.config import CheckpointConfig, Config, LlamaConfig, MeshConfig
    from llama_jax.sharding import make_mesh
    from llama_jax.training.step import Trainer
    cfg = Config(model=LlamaConfig(**{model}))
    state = Trainer(cfg, make_mesh(MeshConfig(1, -1, 1))).init_state()
    ckpt = Checkpointer(sys.argv[1], CheckpointConfig(async_save=True))
    ckpt.save(1, state.params, state.opt_state, {{"position": 1}}, cfg)
    ckpt._manager.wait_until_finished()
    print("step 1 saved", flush=True)
    if sys.argv[2] == "kill":  # hold the commit (the rename of the finished temporary directory) until killed
        rename = os.rename
        def held(src, dst, *a, **k):
            if os.path.basename(dst) == "2":
                print("committing step 2", flush=True)
                time.sleep(600)
            return rename(src, dst, *a, **k)
        os.rename = held
    else:  # a full disk: no file may grow past 2 kB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    ckpt.save(2, state.params, state.opt_state, {{"position": 2}}, cfg)
    try:
        ckpt.close()
    except OSError as err:
        print("error:", err, flush=True)
""").format(model=MODEL)


def start_child(run_dir: Path, fault: str) -> subprocess.Popen:
    # The parent's XLA flags too: the child's initial state is compared bit for bit with one made in this process.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    # Output goes through a pipe: a file would count against the child's file size limit.
    return subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir), fault], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def wait_for(child: subprocess.Popen, marker: str) -> list[str]:
    lines = []
    for line in child.stdout:
        lines.append(line)
        if line.startswith(marker):
            return lines
    pytest.fail(f"child ended without printing {marker!r}:\n{''.join(lines[-30:])}")


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def resume_and_save_again(run_dir: Path) -> None:
    """Resume must give step 1 exactly as initialised, and saving step 2 afresh must work."""
    cfg = Config(model=LlamaConfig(**MODEL))
    trainer = Trainer(cfg, make_mesh(MeshConfig(1, -1, 1)))
    expected = trainer.init_state()

    def abstract_state(execution):
        state = trainer.abstract_state(execution)
        return state.params, state.opt_state

    with Checkpointer(run_dir, CheckpointConfig(async_save=True)) as ckpt:
        restored = ckpt.restore_latest(cfg.model, cfg.execution, abstract_state)
        assert restored.step == 1 and restored.data_state == {"position": 1}
        leaves = [jax.tree.leaves((state.params, state.opt_state)) for state in (restored, expected)]
        assert len(leaves[0]) == len(leaves[1]) > 0
        for got, want in zip(*leaves, strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        ckpt.save(2, restored.params, restored.opt_state, {"position": 2}, cfg)
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == ["1", "2"]


@pytest.mark.e2e
def test_sigkill_during_an_async_checkpoint_write(tmp_path):
    child = start_child(tmp_path / "run", "kill")
    wait_for(child, "step 1 saved")
    step1 = snapshot(tmp_path / "run" / "1")
    wait_for(child, "committing step 2")
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert snapshot(tmp_path / "run" / "1") == step1
    assert not (tmp_path / "run" / "2").exists()
    resume_and_save_again(tmp_path / "run")


@pytest.mark.e2e
def test_disk_full_while_saving(tmp_path):
    child = start_child(tmp_path / "run", "full")
    wait_for(child, "step 1 saved")
    step1 = snapshot(tmp_path / "run" / "1")
    # Read to the end: orbax's threads log their failures (40-75 kB in all), more than a pipe holds, so a child left
    # writing to an unread pipe would never exit. Their lines may interleave with ours, so look for the message.
    rest, _ = child.communicate(timeout=120)
    errors = [line for line in rest.splitlines() if "writing checkpoint step 2" in line]
    assert errors and "(File too large); step 1 is intact" in errors[0], rest[-3000:]
    assert snapshot(tmp_path / "run" / "1") == step1
    resume_and_save_again(tmp_path / "run")


def test_damaged_token_cache_is_detected_and_rebuilt(files, tmp_path, capfd):  # noqa: F811
    tokenizer = Tokenizer(files["tokenizer"])
    docs = files["corpus"].read_text().split("\n\n")
    first = np.array(token_stream(docs, "corpus", tokenizer, tmp_path).tokens)
    (cache,) = (tmp_path / "tokens").iterdir()
    data = bytearray((cache / "tokens.bin").read_bytes())
    data[100] ^= 0xFF  # one flipped byte, same size
    (cache / "tokens.bin").write_bytes(bytes(data))
    rebuilt = token_stream(docs, "corpus", tokenizer, tmp_path)
    assert "is damaged" in capfd.readouterr().err
    np.testing.assert_array_equal(np.array(rebuilt.tokens), first)
    token_stream(docs, "corpus", tokenizer, tmp_path)
    assert "is damaged" not in capfd.readouterr().err  # an intact cache is used as it is


@pytest.mark.e2e
@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_peer_process_ends_the_other_with_one_line_instead_of_a_hang(files, tmp_path, killed,  # noqa: F811
                                                                                monkeypatch):
    """2 processes x 2 devices; SIGKILL one mid-training: the other, left waiting in a collective, sees the killed
    one's heartbeat stop (train.heartbeat_timeout_s=10: after 5 s) and exits with status 3 and one line naming it and
    saying how to resume — before JAX's own fatal error and C++ stack trace (10 s). Killing process 0 also kills the
    coordination service only where it runs inside process 0 (then the survivor's JAX client aborts at once)."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    from launch_local import free_port, process_env

    from llama_jax.config import load_config
    from llama_jax.data import build_train_data
    from llama_jax.distributed import PEER_LOST_STATUS
    cfg = load_config(files["config"])  # prepare the data once, before two processes would race to
    build_train_data(cfg, Tokenizer(cfg.data.tokenizer), process_index=0, process_count=1)
    address = f"127.0.0.1:{free_port()}"
    base = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    command = [sys.executable, "-m", "llama_jax", "train", "--config", str(files["config"]), "train.distributed=true",
               "train.steps=100000", "train.heartbeat_timeout_s=10", f"checkpoint.dir={tmp_path / 'run'}"]
    procs = [subprocess.Popen(command, env=process_env(base, 2, address, 2, i), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    survivor = procs[1 - killed]
    try:
        output = []
        for line in procs[0].stdout:
            output.append(line)
            if "train step 3:" in line:
                break
        procs[killed].kill()
        start = time.monotonic()
        rest, _ = survivor.communicate(timeout=240)
        waited = time.monotonic() - start
    finally:
        for p in procs:
            p.kill()
    log = "".join(output) + rest
    assert any("train step 3:" in line for line in output), log[-3000:]
    assert survivor.returncode == PEER_LOST_STATUS and waited < 60, (waited, log[-3000:])
    last = [line for line in rest.splitlines() if line.strip()][-1]
    assert last.startswith(f"error: process {killed} of this 2-process run stopped responding"), log[-3000:]
    assert f"process {1 - killed} stops too" in last and "resumes from the last checkpoint" in last, last
    assert "Traceback" not in rest and "stack trace" not in rest and "Terminating process" not in rest, rest[-3000:]

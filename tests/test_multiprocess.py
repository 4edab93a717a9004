"""Multi-process training: 2 processes x 4 CPU devices train exactly like 1 process x 8, stop together on a SIGTERM
to one of them, and leave a checkpoint that a single process resumes at the next step — with in-memory and with
streamed data (whose per-process positions are gathered into the checkpoint and regrouped for one process)."""

import io
import os
import re
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest
import yaml
from tensorboardX.proto.event_pb2 import Event

from llama_jax import coordination_service
from llama_jax.config import ConfigError, TrainConfig, load_config
from llama_jax.data import build_train_data
from llama_jax.distributed import cluster_args, initialize
from llama_jax.tokenizer import Tokenizer
from llama_jax.training.loop import train

REPO = Path(__file__).resolve().parents[1]
# O0 LLVM: the random init compiles ~5x faster on CPU; a collective that never completes fails within a minute.
CHILD_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_collective_call_terminate_timeout_seconds=60"


def test_cluster_args_from_config_then_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert cluster_args(TrainConfig(), env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                                "process_id": 3}
    assert cluster_args(TrainConfig(process_id=1), env)["process_id"] == 1
    assert cluster_args(TrainConfig(), {}) == {}  # TPU VMs: JAX detects the cluster


@pytest.mark.parametrize("train, env, message", [
    (TrainConfig(coordinator_address="h:1"), {}, "train.num_processes"),
    (TrainConfig(), {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "train.coordinator_address"),
    (TrainConfig(coordinator_address="h:1", num_processes=2, process_id=2), {}, "must be in 0..1"),
    (TrainConfig(), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "must be an integer"),
])
def test_cluster_args_errors(train, env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        cluster_args(train, env)


@pytest.fixture
def services(monkeypatch) -> list[tuple]:
    """Records the coordination service processes `initialize` would start (the e2e tests in test_faults.py run
    real ones)."""
    started = []

    def spawn(*args, **kwargs):
        started.append((*args, kwargs))
        return SimpleNamespace(stdin=io.StringIO())  # what the atexit hook writes "done" to

    monkeypatch.setattr(coordination_service, "spawn", spawn)
    return started


def test_initialize_joins_the_cluster_only_when_distributed(monkeypatch, services):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    cluster = dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
    initialize(TrainConfig(distributed=False, **cluster))
    assert calls == []
    initialize(TrainConfig(distributed=True, heartbeat_timeout_s=30, **cluster))
    initialize(TrainConfig(distributed=True))  # TPU VM: JAX detects the cluster
    assert calls == [{**cluster, "heartbeat_timeout_seconds": 30}, {"heartbeat_timeout_seconds": 100}]
    assert services == []
    initialize(TrainConfig(distributed=True, heartbeat_timeout_s=30, **{**cluster, "process_id": 0}))
    # process 0 moves JAX's in-process service to a spare port; its own service process takes the address
    assert calls[-1] == {**cluster, "process_id": 0, "heartbeat_timeout_seconds": 30,
                         "coordinator_bind_address": "127.0.0.1:0"}
    assert services == [(1234, 2, 30, {"linger_s": 20.0})]


@pytest.mark.parametrize("train, hint", [
    (TrainConfig(distributed=True), "JAX found no cluster to join here; set train.coordinator_address"),
    (TrainConfig(distributed=True, coordinator_address="h:1", num_processes=2, process_id=0),
     "start every process with the same coordinator address"),
])
def test_initialize_failure_is_one_line_with_the_fix(monkeypatch, services, train, hint):
    def refuse(**kwargs):
        raise RuntimeError("connection refused\n(grpc details)")

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", refuse)
    with pytest.raises(ConfigError) as err:
        initialize(train)
    assert "initialize failed (connection refused); " + hint in str(err.value) and "\n" not in str(err.value)


def event_files(run_dir: Path) -> set[Path]:
    return set((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def logged(run_dir: Path, files: set[Path] | None = None, tag: str = "train/loss") -> dict[int, float]:
    """step -> value of one scalar in a run's TensorBoard event files (TFRecord framing around Event protos)."""
    values = {}
    for path in sorted(event_files(run_dir) if files is None else files):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (size,) = struct.unpack_from("<Q", data, pos)
            event = Event.FromString(data[pos + 12:pos + 12 + size])
            pos += 12 + size + 4
            values.update((event.step, v.simple_value) for v in event.summary.value if v.tag == tag)
    return values


def launch(config: Path, processes: int, devices: int, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": CHILD_XLA_FLAGS}
    return subprocess.Popen([sys.executable, str(REPO / "experiments" / "launch_local.py"), "-n", str(processes),
                             "-d", str(devices), "--config", str(config), *overrides],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(params=[False, pytest.param(True, marks=pytest.mark.e2e)], ids=["in_memory", "streaming"])
def run_config(request, tmp_path, play_txt, tokenizer_1k) -> Path:
    """A tiny model on 100 KB of play text with a fixed tokenizer and a constant learning rate (so the schedule does
    not depend on train.steps); the token cache is prepared here, before several processes would race to make it.
    Streaming reads the text as 4 files in 4 streams (2 per process)."""
    text = tmp_path / "play.txt"
    text.write_bytes(play_txt.read_bytes()[:100_000])
    source, streaming = {"name": str(text)}, {}
    if request.param:
        lines = text.read_text().splitlines(keepends=True)
        for i in range(4):
            (tmp_path / f"part{i}.txt").write_text("".join(lines[i::4]))
        source, streaming = {"name": str(tmp_path / "part*.txt")}, {"streaming": True, "streams": 4,
                                                                     "shuffle_buffer": 8}
    raw = {
        "model": {"preset": "tiny", "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 1024,
                  "max_seq_len": 32},
        "data": {"sources": [source], "seq_len": 32, "tokenizer": str(tokenizer_1k),
                 "cache_dir": str(tmp_path / "cache"), **streaming},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "min_lr_ratio": 1.0},
        "train": {"steps": 1000, "batch_size": 8, "log_every": 1, "eval_every": 0, "sample_tokens": 0},
        "checkpoint": {"dir": str(tmp_path / "two_processes"), "every": 0},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    build_train_data(cfg, Tokenizer(cfg.data.tokenizer), process_index=0, process_count=1)
    return path


@pytest.mark.e2e
def test_two_processes_match_one_stop_together_and_resume(run_config, tmp_path):
    # 2 processes x 4 devices until process 1 alone gets SIGTERM (after process 0 logged step 3).
    two = launch(run_config, 2, 4)
    timer = threading.Timer(300, two.kill)
    timer.start()
    pids, output = {}, []
    for line in two.stdout:
        output.append(line)
        if m := re.match(r"\[launch\] process (\d+): pid (\d+)", line):
            pids[int(m[1])] = int(m[2])
        if line.startswith("[p0]") and "train step 3:" in line:
            os.kill(pids[1], signal.SIGTERM)
    timer.cancel()
    log = "".join(output)
    assert two.wait() == 0, log
    stops = re.findall(r"\[p(\d)\] run .*: stopped at step (\d+) \((\w+)\)", log)
    assert sorted(p for p, _, _ in stops) == ["0", "1"], log
    assert {(s, why) for _, s, why in stops} == {(stops[0][1], "signal")}, log  # same step on both processes
    stop = int(stops[0][1])
    run_dir = tmp_path / "two_processes"
    assert sorted(p.name for p in run_dir.iterdir() if p.name.isdigit()) == [str(stop)]  # one coordinated save
    two_losses = logged(run_dir)
    assert sorted(two_losses) == list(range(1, stop + 1))

    # The same run on 1 process x 8 devices, two steps further: identical losses step by step.
    one = launch(run_config, 1, 8, f"train.steps={stop + 2}", f"checkpoint.dir={tmp_path / 'one_process'}")
    out, _ = one.communicate(timeout=300)
    assert one.returncode == 0, out
    reference = logged(tmp_path / "one_process")
    assert reference[stop] < reference[1] - 0.05  # the model really learned
    assert two_losses == pytest.approx({s: reference[s] for s in two_losses}, rel=1e-5)

    # One process (this one, 8 devices) resumes the 2-process checkpoint at step stop + 1 and continues the same run.
    before = event_files(run_dir)
    result = train(load_config(run_config, [f"train.steps={stop + 2}"]))
    assert result.step == stop + 2 and result.stopped == "steps"
    resumed = logged(run_dir, event_files(run_dir) - before)
    assert resumed == pytest.approx({s: reference[s] for s in (stop + 1, stop + 2)}, rel=1e-5)


def test_coordination_service_stops_at_once_after_a_normal_exit_and_lingers_after_a_crash(monkeypatch):
    """A real service process: 'done' then end of input (process 0 passed JAX's shutdown) ends it at once; end of
    input alone (process 0 was killed) keeps it serving the survivors for `linger_s`."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    from launch_local import free_port

    normal = coordination_service.spawn(free_port(), 2, 10, linger_s=60)
    normal.stdin.write(coordination_service.DONE + "\n")
    normal.stdin.close()
    assert normal.wait(timeout=10) == 0
    killed = coordination_service.spawn(free_port(), 2, 10, linger_s=60)
    killed.stdin.close()
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            killed.wait(timeout=2)
    finally:
        killed.kill()
        killed.wait()

"""tpu_setup/ scripts (checked through --dry-run: the exact gcloud commands) and the TPU recipe configs."""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llama_jax.config import load_config
from llama_jax.sharding import mesh_shape

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "tpu_setup"
SCRIPTS = sorted(TPU.glob("*.sh"))
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "llama-test", "--project=my-proj", "--zone=us-central2-b"]
SETTINGS = {
    "PROJECT": "my-proj",
    "ZONE": "us-central2-b",
    "TPU_NAME": "llama-test",
    "ACCELERATOR_TYPE": "v4-8",
    "RUNTIME_VERSION": "tpu-ubuntu2204-base",
    "GCS_BUCKET": "gs://my-bucket/",
    "REPO": "https://github.com/me/llama_jax.git",
    "CONFIG": "experiments/configs/llama2_7b_v4_8.yaml",
}


def env_file(tmp_path: Path, **changes: str | None) -> Path:
    """A settings file from SETTINGS with `changes` applied (None removes a key)."""
    settings = {**SETTINGS, **changes}
    path = tmp_path / f"tpu{len(list(tmp_path.glob('tpu*.env')))}.env"
    path.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in settings.items() if v is not None))
    return path


def run(script: str, *args: str, env: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TPU / script), "--dry-run", "--env", str(env), *args],
                          capture_output=True, text=True, timeout=30, cwd=REPO)


def commands(script: str, *args: str, env: Path) -> list[list[str]]:
    """The dry-run output of a script, each printed command split back into its words."""
    result = run(script, *args, env=env)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def remote(command: list[str]) -> str:
    """The remote shell line of a `gcloud ... ssh --command=...` command."""
    (flag,) = [w for w in command if w.startswith("--command=")]
    return flag.removeprefix("--command=")


def test_create_on_demand_spot_and_queued(tmp_path):
    assert commands("create.sh", env=env_file(tmp_path)) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "llama-test", "--project=my-proj", "--zone=us-central2-b",
        "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base"]]
    spot = env_file(tmp_path, ACCELERATOR_TYPE="v5litepod-16", RUNTIME_VERSION="v2-alpha-tpuv5-lite", SPOT="true")
    assert commands("create.sh", env=spot) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "llama-test", "--project=my-proj", "--zone=us-central2-b",
        "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot"]]
    queued = env_file(tmp_path, ACCELERATOR_TYPE="v5p-128", RUNTIME_VERSION="v2-alpha-tpuv5", SPOT="true",
                      QUEUED="true", QUEUED_VALID_FOR="6h")
    assert commands("create.sh", env=queued) == [[
        "gcloud", "compute", "tpus", "queued-resources", "create", "llama-test", "--node-id=llama-test",
        "--project=my-proj", "--zone=us-central2-b", "--accelerator-type=v5p-128",
        "--runtime-version=v2-alpha-tpuv5", "--valid-until-duration=6h", "--spot"]]


def test_status_and_delete(tmp_path):
    plain, queued = env_file(tmp_path), env_file(tmp_path, QUEUED="true")
    assert commands("status.sh", env=plain) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", "llama-test", "--project=my-proj", "--zone=us-central2-b"]]
    assert commands("delete.sh", env=plain) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "llama-test", "--project=my-proj", "--zone=us-central2-b"]]
    assert commands("delete.sh", "--yes", env=queued) == [[
        "gcloud", "compute", "tpus", "queued-resources", "delete", "llama-test", "--project=my-proj",
        "--zone=us-central2-b", "--force", "--quiet"]]
    assert commands("status.sh", env=queued)[0][3:5] == ["queued-resources", "describe"]


def test_setup_clones_and_installs_on_every_worker(tmp_path):
    (cmd,) = commands("setup.sh", env=env_file(tmp_path, TOKENIZER_URI="gs://my-bucket/tok.model"))
    assert cmd[:-1] == SSH + ["--worker=all"]
    line = remote(cmd)
    assert line.startswith("set -e; if [ -d llama_jax/.git ]; then git -C llama_jax pull --ff-only; "
                           "else git clone --branch main https://github.com/me/llama_jax.git llama_jax; fi; ")
    steps = line.split("; ")
    assert "$HOME/llama_jax_venv/bin/pip install -r requirements.txt -e ." in steps
    assert "$HOME/llama_jax_venv/bin/pip install 'jax[tpu]==0.10.2'" in steps
    assert "gcloud storage cp gs://my-bucket/tok.model tokenizer.model" in steps
    assert steps.index("cd llama_jax") < steps.index("$HOME/llama_jax_venv/bin/pip install -r requirements.txt -e .")


def test_setup_without_repo_copies_the_checkout(tmp_path):
    archive, scp, ssh = commands("setup.sh", env=env_file(tmp_path, REPO=None, JAX_VERSION="0.10.9"))
    tarball = archive[-2].removeprefix("--output=")
    assert archive == ["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "llama-test:llama_jax_src.tar.gz",
                   "--project=my-proj", "--zone=us-central2-b", "--worker=all"]
    assert "mkdir -p llama_jax && tar -xzf llama_jax_src.tar.gz -C llama_jax" in remote(ssh)
    assert "'jax[tpu]==0.10.9'" in remote(ssh)


def test_train_starts_the_same_command_on_all_workers(tmp_path):
    (cmd,) = commands("train.sh", "optim.lr=1e-4", "train.steps=10", env=env_file(tmp_path))
    assert cmd[:-1] == SSH + ["--worker=all"]
    line = remote(cmd)
    train = ("-m llama_jax train --config experiments/configs/llama2_7b_v4_8.yaml train.distributed=true "
             "checkpoint.dir=gs://my-bucket/runs/llama-test optim.lr=1e-4 train.steps=10")
    assert (f"PYTHONUNBUFFERED=1 setsid nohup $HOME/llama_jax_venv/bin/python {train} "
            ">> $HOME/llama_jax_logs/train.log 2>&1 < /dev/null & echo $! > $HOME/llama_jax_logs/train.pid") in line
    assert "already running" in line and line.index("kill -0") < line.index("setsid")
    (other,) = commands("train.sh", "--config", "experiments/configs/llama2_70b_v5p_128.yaml",
                        env=env_file(tmp_path, RUN_NAME="big"))
    assert "--config experiments/configs/llama2_70b_v5p_128.yaml" in remote(other)
    assert "checkpoint.dir=gs://my-bucket/runs/big" in remote(other)


def test_the_remote_lines_are_valid_shell(tmp_path):
    env = env_file(tmp_path, TOKENIZER_URI="gs://b/it's.model")
    for script, args in [("setup.sh", ()), ("train.sh", ("data.sources=[{name: a b}]",)), ("stop.sh", ()),
                         ("logs.sh", ()), ("ckpt.sh", ("from-vm", "runs/x"))]:
        for cmd in commands(script, *args, env=env):
            if cmd[:5] == SSH[:5]:
                check = subprocess.run(["bash", "-n", "-c", remote(cmd)], capture_output=True, text=True)
                assert check.returncode == 0, (script, check.stderr)
    (train,) = commands("train.sh", "data.sources=[{name: a b}]", env=env)
    assert "'data.sources=[{name: a b}]'" in remote(train)


def test_logs_stop_and_checkpoints(tmp_path):
    env = env_file(tmp_path)
    assert commands("logs.sh", env=env) == [SSH + ["--worker=0", "--command=tail -n 100 -F $HOME/llama_jax_logs/train.log"]]
    assert commands("logs.sh", "--worker", "all", "--lines=20", "--no-follow", env=env) == [
        SSH + ["--worker=all", "--command=tail -n 20 $HOME/llama_jax_logs/train.log"]]
    (stop,) = commands("stop.sh", env=env)
    assert stop[:-1] == SSH + ["--worker=all"] and 'kill -TERM -- "-$(cat $HOME/llama_jax_logs/train.pid)"' in stop[-1]
    assert commands("ckpt.sh", "pull", env=env) == [
        ["gcloud", "storage", "rsync", "--recursive", "gs://my-bucket/runs/llama-test", "runs/llama-test"]]
    local = tmp_path / "hf_7b"
    local.mkdir()
    assert commands("ckpt.sh", "push", str(local), env=env) == [
        ["gcloud", "storage", "rsync", "--recursive", str(local), "gs://my-bucket/models/hf_7b"]]
    assert commands("ckpt.sh", "from-vm", "runs/local", env=env) == [SSH + [
        "--worker=0", "--command=cd llama_jax && gcloud storage rsync --recursive runs/local "
        "gs://my-bucket/runs/llama-test"]]


@pytest.mark.parametrize("script, args, changes, message", [
    ("create.sh", (), {"ZONE": None, "ACCELERATOR_TYPE": None}, "missing setting(s) ZONE ACCELERATOR_TYPE in"),
    ("train.sh", (), {"CONFIG": None}, "missing setting(s) CONFIG in"),
    ("train.sh", (), {"GCS_BUCKET": "my-bucket"}, "GCS_BUCKET must look like gs://my-bucket"),
    ("train.sh", ("--config", "experiments/configs/nope.yaml"), {}, "config 'experiments/configs/nope.yaml' not found"),
    ("train.sh", ("lr",), {}, "unexpected argument 'lr'"),
    ("create.sh", (), {"SPOT": "maybe"}, "SPOT must be true or false, got 'maybe'"),
    ("ckpt.sh", ("push", "/no/such/dir"), {}, "local directory '/no/such/dir' not found"),
    ("logs.sh", ("--worker", "x"), {}, "--worker must be a worker number or 'all'"),
    ("delete.sh", ("--force",), {}, "unexpected argument '--force'"),
])
def test_bad_settings_fail_with_one_line(tmp_path, script, args, changes, message):
    result = run(script, *args, env=env_file(tmp_path, **changes))
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr


def test_missing_env_file_and_help(tmp_path):
    result = run("create.sh", env=tmp_path / "absent.env")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "tpu.env.example" in result.stderr
    for script in SCRIPTS:
        if script.name != "common.sh":
            shown = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
            assert shown.returncode == 0 and shown.stdout.startswith(f"Usage: tpu_setup/{script.name}"), script


def test_the_example_env_file_is_complete(tmp_path):
    example = TPU / "tpu.env.example"
    for script in ("create.sh", "setup.sh", "train.sh", "stop.sh", "logs.sh", "status.sh", "delete.sh"):
        assert run(script, env=example).returncode == 0, script


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install -r requirements-dev.txt)")
    result = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=TPU)
    assert result.returncode == 0, result.stdout


# name -> (chips, HBM GiB per chip) of the slice each recipe is written for
RECIPES = {
    "llama2_7b_v4_8": (4, 32),
    "llama2_7b_v5e_16": (16, 16),
    "llama2_13b_v5p_128": (64, 95),
    "llama2_70b_v5p_128": (64, 95),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_configs_fit_their_slice(name):
    chips, hbm_gib = RECIPES[name]
    cfg = load_config(REPO / "experiments" / "configs" / f"{name}.yaml")
    data, fsdp, tensor = mesh_shape(cfg.mesh, chips)
    assert cfg.train.batch_size % (data * fsdp) == 0
    assert cfg.model.n_heads % tensor == 0 and cfg.model.n_kv_heads % tensor == 0
    assert cfg.execution.remat == "full" and cfg.execution.scan_layers and cfg.train.distributed
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    # fp32 params + grads + AdamW mu/nu = 16 B/param, fully sharded over fsdp x tensor; leave >= 15% for activations
    state_gib = cfg.model.num_params() * 16 / (fsdp * tensor) / 2**30
    assert state_gib < 0.85 * hbm_gib, state_gib

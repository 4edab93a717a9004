"""tpu_setup/ scripts (checked through --dry-run: the exact gcloud commands) and the TPU recipe configs."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import missing_tool


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
    "CONFIG": "experiments/configs/llama2_7b_v4_16.yaml",
}


def env_file(tmp_path: Path, **changes: str | None) -> Path:
    """A settings file from SETTINGS with `changes` applied (None removes a key)."""
    settings = {**SETTINGS, **changes}
    path = tmp_path / f"tpu{len(list(tmp_path.glob('tpu*.env')))}.env"
    path.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in settings.items() if v is not None))
    return path


def run(script: str, *args: str, env: Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """A script with --dry-run; $HOME is the env file's directory (prereqs.sh looks for the ssh key there)."""
    return subprocess.run(["bash", str(TPU / script), "--dry-run", "--env", str(env), *args], capture_output=True,
                          text=True, timeout=30, cwd=cwd, env={**os.environ, "HOME": str(env.parent)})


def commands(script: str, *args: str, env: Path, cwd: Path = REPO) -> list[list[str]]:
    """The dry-run output of a script, each printed command split back into its words."""
    result = run(script, *args, env=env, cwd=cwd)
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
    # jax[tpu] in the same resolve as requirements.txt: a separate install could leave a jax libtpu does not match
    install = "$HOME/llama_jax_venv/bin/pip install -r requirements.txt -e . 'jax[tpu]==0.10.2'"
    assert install in steps and sum("pip install" in step for step in steps) == 2  # uv, then the project
    assert "gcloud storage cp gs://my-bucket/tok.model tokenizer.model" in steps
    assert steps.index("cd llama_jax") < steps.index(install)


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
    train = ("-m llama_jax train --config experiments/configs/llama2_7b_v4_16.yaml train.distributed=true "
             "checkpoint.dir=gs://my-bucket/runs/llama-test data.data_dir=gs://my-bucket/tensorflow_datasets "
             "optim.lr=1e-4 train.steps=10")
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
    ("recover.sh", (), {}, "a dry run cannot ask gcloud for the state; add --state PREEMPTED"),
    ("prereqs.sh", (), {"GCS_BUCKET": "s3://b"}, "GCS_BUCKET must look like gs://my-bucket"),
    ("data.sh", ("tokenizer", "/no/such.model"), {}, "tokenizer file '/no/such.model' not found"),
    ("data.sh", ("weights",), {}, "unknown command 'weights'"),
    ("create.sh", (), {"INTERNAL_IPS": "yes please"}, "INTERNAL_IPS must be true or false"),
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
    example = tmp_path / "tpu.env"
    shutil.copy(TPU / "tpu.env.example", example)
    for script, *args in [("prereqs.sh",), ("data.sh", "dataset"), ("create.sh",), ("setup.sh",), ("train.sh",),
                          ("stop.sh",), ("logs.sh",), ("status.sh",), ("recover.sh", "--state", "PREEMPTED"),
                          ("delete.sh",)]:
        result = run(script, *args, env=example)
        assert result.returncode == 0, (script, result.stderr)


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        missing_tool("shellcheck not installed (pip install -r requirements-dev.txt)")
    result = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=TPU)
    assert result.returncode == 0, result.stdout




def test_network_settings_reach_create_ssh_and_scp(tmp_path):
    env = env_file(tmp_path, NETWORK="tpu-net", SUBNET="tpu-subnet", INTERNAL_IPS="true",
                   SERVICE_ACCOUNT="trainer@my-proj.iam.gserviceaccount.com", REPO=None)
    (create,) = commands("create.sh", env=env)
    assert create[-4:] == ["--network=tpu-net", "--subnetwork=tpu-subnet", "--internal-ips",
                           "--service-account=trainer@my-proj.iam.gserviceaccount.com"]
    (queued,) = commands("create.sh", env=env_file(tmp_path, QUEUED="true", NETWORK="tpu-net", INTERNAL_IPS="true"))
    assert queued[3:5] == ["queued-resources", "create"] and queued[-2:] == ["--network=tpu-net", "--internal-ips"]
    _, scp, ssh = commands("setup.sh", env=env)
    assert scp[-1] == "--internal-ip" and ssh[:-1] == SSH + ["--worker=all", "--internal-ip"]
    (logs,) = commands("logs.sh", env=env)
    assert "--internal-ip" in logs


def test_prereqs_enable_the_api_make_the_bucket_and_grant_the_tpu_account(tmp_path):
    env = env_file(tmp_path, GCS_BUCKET="gs://my-bucket/team/")
    key = str(tmp_path / ".ssh" / "google_compute_engine")
    assert commands("prereqs.sh", env=env) == [
        ["gcloud", "services", "enable", "tpu.googleapis.com", "--project=my-proj"],
        ["gcloud", "storage", "buckets", "create", "gs://my-bucket", "--project=my-proj", "--location=us-central2",
         "--uniform-bucket-level-access"],
        ["gcloud", "projects", "describe", "my-proj", "--format=value(projectNumber)"],
        ["gcloud", "storage", "buckets", "add-iam-policy-binding", "gs://my-bucket",
         "--member=serviceAccount:PROJECT_NUMBER-compute@developer.gserviceaccount.com",
         "--role=roles/storage.objectAdmin"],
        ["ssh-keygen", "-t", "rsa", "-f", key],  # before ssh-add, which fails on a missing key
        ["ssh-add", key],
    ]
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "google_compute_engine").write_text("key")
    account = env_file(tmp_path, SERVICE_ACCOUNT="trainer@my-proj.iam.gserviceaccount.com")
    again = commands("prereqs.sh", env=account)
    assert [c[0] for c in again] == ["gcloud", "gcloud", "gcloud", "ssh-add"]  # no number lookup, no new key
    assert "--member=serviceAccount:trainer@my-proj.iam.gserviceaccount.com" in again[2]


def test_data_copies_the_prepared_dataset_and_uploads_the_tokenizer(tmp_path):
    env = env_file(tmp_path, TOKENIZER_URI="gs://my-bucket/llama2/tokenizer.model")
    assert commands("data.sh", "dataset", env=env) == [[
        "gcloud", "storage", "cp", "-r", "--billing-project=my-proj",
        "gs://allennlp-tensorflow-datasets/c4/en/3.0.1", "gs://my-bucket/tensorflow_datasets/c4/en/"]]
    other = env_file(tmp_path, DATASET="lm1b/1.1.0", DATASET_SOURCE="gs://team-data/tfds/")
    assert commands("data.sh", "dataset", env=other)[0][-2:] == ["gs://team-data/tfds/lm1b/1.1.0",
                                                                 "gs://my-bucket/tensorflow_datasets/lm1b/"]
    model = tmp_path / "tokenizer.model"
    model.write_bytes(b"sentencepiece")
    assert commands("data.sh", "tokenizer", str(model), env=env) == [
        ["gcloud", "storage", "cp", str(model), "gs://my-bucket/llama2/tokenizer.model"]]


DESCRIBE_VM = ["gcloud", "compute", "tpus", "tpu-vm", "describe", "llama-test", "--project=my-proj",
               "--zone=us-central2-b", "--format=value(state)"]


@pytest.mark.parametrize("state, recreated", [
    ("PREEMPTED", True), ("TERMINATED", True), ("NOT_FOUND", False), ("READY", None), ("CREATING", None),
])
def test_recover_a_spot_vm(tmp_path, state, recreated):
    env = env_file(tmp_path, SPOT="true")
    (create,) = commands("create.sh", env=env)
    transcript = commands("recover.sh", "--state", state, env=env)
    delete = ["gcloud", "compute", "tpus", "tpu-vm", "delete", "llama-test", "--project=my-proj",
              "--zone=us-central2-b", "--quiet"]
    expected = {True: [DESCRIBE_VM, delete, create], False: [DESCRIBE_VM, create], None: [DESCRIBE_VM]}[recreated]
    assert transcript == expected


@pytest.mark.parametrize("state, recreated", [("SUSPENDED", True), ("FAILED", True), ("ACTIVE", False),
                                              ("WAITING_FOR_RESOURCES", False)])
def test_recover_a_queued_resource(tmp_path, state, recreated):
    env = env_file(tmp_path, SPOT="true", QUEUED="true", ACCELERATOR_TYPE="v5p-128", RUNTIME_VERSION="v2-alpha-tpuv5")
    (create,) = commands("create.sh", env=env)
    transcript = commands("recover.sh", "--state", state, env=env)
    assert transcript[0] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "llama-test",
                             "--project=my-proj", "--zone=us-central2-b", "--format=value(state.state)"]
    delete = ["gcloud", "compute", "tpus", "queued-resources", "delete", "llama-test", "--project=my-proj",
              "--zone=us-central2-b", "--force", "--quiet"]  # --force: the request and its preempted VMs
    assert transcript[1:] == ([delete, create] if recreated else [])


def test_recover_reads_the_real_state_outside_dry_runs(tmp_path):
    result = subprocess.run(["bash", str(TPU / "recover.sh"), "--env", str(env_file(tmp_path)), "--state", "READY"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "--state is only for --dry-run" in result.stderr


def readme_blocks() -> list[list[str]]:
    """The command lines of each bash block in tpu_setup/README.md (the first is the first-run walkthrough)."""
    blocks = [block.split("```", 1)[0] for block in (TPU / "README.md").read_text().split("```bash\n")[1:]]
    return [[code for code in (line.split(" #")[0].strip() for line in block.splitlines()) if code]
            for block in blocks]


def walkthrough() -> list[str]:
    return readme_blocks()[0]


def test_every_readme_command_runs_dry(tmp_path):
    env = env_file(tmp_path, QUEUED="true", ACCELERATOR_TYPE="v5p-128", RUNTIME_VERSION="v2-alpha-tpuv5")
    lines = [line for block in readme_blocks()[1:] for line in block]
    assert lines
    for line in lines:
        script, *args = shlex.split(line)
        assert script.startswith("tpu_setup/"), line
        assert commands(script.removeprefix("tpu_setup/"), *args, env=env), line


def test_the_readme_walkthrough_runs_dry(tmp_path):
    """Every tpu_setup command of the README's first run, in order (with a preemption simulated by --state):
    prereqs -> data -> create -> setup -> train -> recover -> setup -> train, checked by the gcloud commands."""
    from llama_jax.cli import build_parser
    env = env_file(tmp_path, SPOT="true", TOKENIZER_URI="gs://my-bucket/llama2/tokenizer.model")
    (tmp_path / "llama-2-7b").mkdir()
    (tmp_path / "llama-2-7b" / "tokenizer.model").write_bytes(b"sentencepiece")
    steps: list[tuple[str, list[list[str]]]] = []
    for line in walkthrough():
        words = shlex.split(line)
        if words[0].startswith("tpu_setup/"):
            script, args = words[0].removeprefix("tpu_setup/"), words[1:]
            if script == "recover.sh":
                args += ["--state", "PREEMPTED"]  # what status.sh shows after a spot preemption
            steps.append((script, commands(script, *args, env=env, cwd=tmp_path)))
        elif words[:3] == ["python", "-m", "llama_jax"]:
            assert callable(build_parser().parse_args(words[3:]).run)
    scripts = [script for script, _ in steps]
    assert scripts[:7] == ["prereqs.sh", "data.sh", "data.sh", "create.sh", "status.sh", "setup.sh", "train.sh"]
    assert scripts[scripts.index("recover.sh"):][:3] == ["recover.sh", "setup.sh", "train.sh"]
    run_of = dict(reversed(steps))  # the first transcript of each script
    prereqs = [c[:3] for c in run_of["prereqs.sh"]]
    assert prereqs[0] == ["gcloud", "services", "enable"] and prereqs[-2:] == [["ssh-keygen", "-t", "rsa"],
                                                                             ["ssh-add", prereqs[-1][1]]]
    (create,) = run_of["create.sh"]
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and create[-1] == "--spot"
    recover = steps[scripts.index("recover.sh")][1]
    assert [c[4] for c in recover] == ["describe", "delete", "create"] and recover[-1] == create
    trains = [cmds for script, cmds in steps if script == "train.sh"]
    assert len(trains) == 2 and trains[0] == trains[1]  # the same command: it resumes from the GCS checkpoint
    assert "checkpoint.dir=gs://my-bucket/runs/llama-test data.data_dir=gs://my-bucket/tensorflow_datasets" \
        in remote(trains[0][0])
    assert any(c[:4] == ["gcloud", "storage", "cp", "-r"] for c in run_of["data.sh"])

"""Cluster launchers beyond TPU VMs: the SLURM batch script (dry run, shellcheck, what JAX reads from SLURM's
variables) and the Kubernetes JobSet renderer for GKE TPU slices and GPU node pools."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
sys.path.insert(0, str(REPO / "launch" / "k8s"))
import jobset  # noqa: E402


def test_sbatch_is_shellcheck_clean():
    result = subprocess.run([sys.executable, "-m", "shellcheck", str(SBATCH)], capture_output=True, text=True)
    if "No module named shellcheck" in result.stderr:
        result = subprocess.run([str(Path(sys.executable).parent / "shellcheck"), str(SBATCH)],
                                capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sbatch_directives_and_dry_run():
    directives = dict(line.removeprefix("#SBATCH --").split("=", 1) for line in SBATCH.read_text().splitlines()
                      if line.startswith("#SBATCH --") and "=" in line)
    assert directives["ntasks-per-node"] == "1" and directives["signal"] == "TERM@300"
    run = subprocess.run(["bash", str(SBATCH), "--dry-run", "--config", "my config.yaml", "optim.lr=1e-3"],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": "/opt/py/bin/python"})
    assert run.returncode == 0, run.stderr
    assert shlex.split(run.stdout) == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", "/opt/py/bin/python",
                                       "-m", "llama_jax", "train", "--config", "my config.yaml", "optim.lr=1e-3",
                                       "train.distributed=true"]
    run = subprocess.run(["bash", str(SBATCH), "--dry-run"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: pass the training arguments")


def test_jax_reads_the_cluster_from_slurm_variables(monkeypatch):
    """What srun gives each task is enough for jax.distributed.initialize() with no arguments (our cluster_args
    stays empty), so the script configures nothing by hand."""
    from jax._src.clusters import SlurmCluster

    from llama_jax.config import TrainConfig
    from llama_jax.distributed import cluster_args
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[007-010]", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
           "SLURM_LOCALID": "0"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cluster_args(TrainConfig(distributed=True), env) == {}
    assert SlurmCluster.is_env_present()
    assert SlurmCluster.get_coordinator_address(None, None).startswith("gpu007:")
    assert SlurmCluster.get_process_count() == 4 and SlurmCluster.get_process_id() == 2


def render(*args: str, capsys) -> dict:
    assert jobset.main(["--name", "llama", "--image", "img:1", *args, "--dry-run", "--config", "c.yaml",
                        "checkpoint.dir=gs://b/run"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("tpu, accelerator, topology, hosts, chips", [
    ("v5p-128", "tpu-v5p-slice", "4x4x4", 16, 4),
    ("v5e-16", "tpu-v5-lite-podslice", "4x4", 4, 4),
    ("v6e-8", "tpu-v6e-slice", "2x4", 1, 8),
    ("v4-8", "tpu-v4-podslice", "2x2x1", 1, 4),
])
def test_jobset_for_a_tpu_slice(capsys, tpu, accelerator, topology, hosts, chips):
    manifest = render("--tpu", tpu, capsys=capsys)
    job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod = job["template"]["spec"]
    assert job["parallelism"] == job["completions"] == hosts and job["backoffLimit"] == 0
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": accelerator,
                                   "cloud.google.com/gke-tpu-topology": topology}
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"google.com/tpu": chips} and "env" not in container
    assert container["command"] == ["python", "-m", "llama_jax", "train", "--config", "c.yaml",
                                    "checkpoint.dir=gs://b/run", "train.distributed=true"]


def test_jobset_for_gpu_nodes(capsys):
    manifest = render("--gpus", "8", "--nodes", "4", "--gpu-type", "nvidia-a100-80gb", capsys=capsys)
    job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
    (container,) = job["template"]["spec"]["containers"]
    assert job["parallelism"] == 4 and job["completionMode"] == "Indexed"
    assert job["template"]["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["JAX_COORDINATOR_ADDRESS"] == "llama-workers-0-0.llama:1234" and env["JAX_NUM_PROCESSES"] == "4"
    assert env["JAX_PROCESS_ID"] == {"fieldRef": {"fieldPath": jobset.COMPLETION_INDEX}}


def test_jobset_rejects_an_unknown_slice(capsys):
    assert jobset.main(["--name", "x", "--image", "i", "--tpu", "v9-8", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown TPU topology 'v9-8'")


def readme_launch_lines() -> list[list[str]]:
    from test_readme import _blocks
    return [shlex.split(line.split("  #")[0]) for block in _blocks("bash") for line in block.splitlines()
            if "launch/slurm/" in line or "launch/k8s/" in line]


def test_readme_launch_examples_render(capsys):
    """Every README line that uses launch/ runs here in dry-run form (sbatch lines: the script's own dry run)."""
    lines = readme_launch_lines()
    assert len(lines) >= 4
    for words in lines:
        script = next(i for i, w in enumerate(words) if w.startswith("launch/"))
        args = [w for w in words[script + 1:] if w != "--dry-run"]
        if words[script].endswith(".sbatch"):
            run = subprocess.run(["bash", str(REPO / words[script]), "--dry-run", *args], capture_output=True,
                                 text=True, cwd=REPO)
            assert run.returncode == 0 and "-m llama_jax train" in run.stdout, run.stderr
        else:
            config = args[args.index("--config") + 1]
            assert (REPO / config).is_file(), config
            assert jobset.main([*args, "--dry-run"]) == 0
            assert yaml.safe_load(capsys.readouterr().out)["kind"] == "JobSet"

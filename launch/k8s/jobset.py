"""Render (and apply) a Kubernetes JobSet that trains on a GKE TPU slice or on GPU nodes, one pod per host.

    python launch/k8s/jobset.py --name llama-7b --image us-docker.pkg.dev/me/llama_jax:latest --tpu v5p-128 \
        --config experiments/configs/llama2_13b_v5p_128.yaml checkpoint.dir=gs://my-bucket/runs/13b --dry-run
    python launch/k8s/jobset.py --name llama-7b --image ... --gpus 8 --nodes 4 \
        --gpu-type nvidia-h100-80gb --config ... checkpoint.dir=gs://my-bucket/runs/7b

Without --dry-run the manifest goes to `kubectl apply -f -`. On TPU, GKE tells every pod its slice (TPU_WORKER_ID,
TPU_WORKER_HOSTNAMES) and jax.distributed detects it; on GPU the pods find process 0 through the JobSet's headless
service (`<name>-workers-0-0.<name>`) and take their process id from the Job completion index. A failed pod fails
the JobSet (no pod waits on a dead peer) and JobSet restarts it whole up to --max-restarts times; each restart
resumes from the newest checkpoint, so checkpoint.dir must be shared storage such as gs://.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from llama_jax.config import ConfigError
from llama_jax.plan import parse_topology

# GKE node-selector value per TPU generation, and chips per host of a multi-host slice.
GKE_TPU = {"v4": "tpu-v4-podslice", "v5p": "tpu-v5p-slice", "v5e": "tpu-v5-lite-podslice", "v6e": "tpu-v6e-slice"}
CHIPS_PER_HOST = 4
COORDINATOR_PORT = 1234
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def tpu_hosts(name: str) -> tuple[str, str, int, int]:
    """(GKE accelerator, topology like 4x4x8, hosts, chips per host) of a slice name such as v5p-128."""
    gen, topology, chips = parse_topology(name)
    per_host = chips if chips <= 8 and gen.dims == 2 else min(chips, CHIPS_PER_HOST)
    return GKE_TPU[gen.prefix], topology.split(":")[1], chips // per_host, per_host


def jobset(name: str, image: str, train_args: Sequence[str], *, tpu: str | None = None, gpus: int | None = None,
           nodes: int = 1, gpu_type: str = "nvidia-h100-80gb", max_restarts: int = 3) -> dict[str, Any]:
    """The JobSet manifest as a dict (one replicated job `workers`, one pod per host)."""
    if (tpu is None) == (gpus is None):
        raise ConfigError("give exactly one of --tpu (e.g. v5p-128) or --gpus N (per node)")
    env: list[dict[str, Any]] = []
    if tpu is not None:
        accelerator, topology, hosts, per_host = tpu_hosts(tpu)
        selector = {"cloud.google.com/gke-tpu-accelerator": accelerator, "cloud.google.com/gke-tpu-topology": topology}
        resources = {"google.com/tpu": per_host}
    else:
        if gpus < 1 or nodes < 1:
            raise ConfigError(f"--gpus ({gpus}) and --nodes ({nodes}) must be at least 1")
        hosts, selector, resources = nodes, {"cloud.google.com/gke-accelerator": gpu_type}, {"nvidia.com/gpu": gpus}
        env = [{"name": "JAX_COORDINATOR_ADDRESS", "value": f"{name}-workers-0-0.{name}:{COORDINATOR_PORT}"},
               {"name": "JAX_NUM_PROCESSES", "value": str(hosts)},
               {"name": "JAX_PROCESS_ID", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}}]
    container = {"name": "train", "image": image,
                 "command": ["python", "-m", "llama_jax", "train", *train_args, "train.distributed=true"],
                 "resources": {"limits": resources}}
    if env:
        container["env"] = env
    pod = {"restartPolicy": "Never", "nodeSelector": selector, "containers": [container],
           "terminationGracePeriodSeconds": 300}  # SIGTERM first: the run saves a checkpoint and stops
    job = {"parallelism": hosts, "completions": hosts, "completionMode": "Indexed", "backoffLimit": 0,
           "template": {"spec": pod}}
    exclusive = {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}  # a slice per job
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": name, "annotations": exclusive},
            "spec": {"failurePolicy": {"maxRestarts": max_restarts},
                     "replicatedJobs": [{"name": "workers", "replicas": 1, "template": {"spec": job}}]}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="JobSet name (a DNS label, e.g. llama-7b)")
    parser.add_argument("--image", required=True, help="container image with llama_jax installed")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--tpu", help="TPU slice, e.g. v5p-128, v5e-16, v6e-8 or v5p:4x4x8")
    target.add_argument("--gpus", type=int, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1, help="GPU nodes (TPU: from the slice)")
    parser.add_argument("--gpu-type", default="nvidia-h100-80gb", help="GKE accelerator label of the GPU node pool")
    parser.add_argument("--max-restarts", type=int, default=3, help="whole-JobSet restarts after a failure")
    parser.add_argument("--dry-run", action="store_true", help="print the manifest instead of applying it")
    args, train_args = parser.parse_known_args(argv)  # the rest (--config FILE key=value ...) is for `train`
    try:
        manifest = yaml.safe_dump(jobset(args.name, args.image, train_args, tpu=args.tpu, gpus=args.gpus,
                                         nodes=args.nodes, gpu_type=args.gpu_type, max_restarts=args.max_restarts),
                                  sort_keys=False)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(manifest, end="")
        return 0
    return subprocess.run(["kubectl", "apply", "-f", "-"], input=manifest, text=True).returncode


if __name__ == "__main__":
    sys.exit(main())

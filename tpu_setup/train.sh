#!/usr/bin/env bash
# Usage: tpu_setup/train.sh [--dry-run] [--env FILE] [--config PATH] [key=value ...]
#
# Start the same training command on every worker of TPU_NAME, in the background (setsid
# nohup), appending to ~/llama_jax_logs/train.log on each worker:
#   python -m llama_jax train --config CONFIG train.distributed=true \
#     checkpoint.dir=GCS_BUCKET/runs/RUN_NAME data.data_dir=GCS_BUCKET/tensorflow_datasets [key=value ...]
# Refuses to start where a training started by this script is still running
# (stop it with tpu_setup/stop.sh). Follow it with tpu_setup/logs.sh.
#
#   --config PATH  training config inside the repository (default: CONFIG from the env file)
#   key=value      config overrides, e.g. train.steps=100 optim.lr=1e-4
#   --dry-run      print the gcloud command instead of running it
#   --env FILE     settings file (default tpu_setup/tpu.env)
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
tpu_init "$@"
overrides=()
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  case $1 in
    --config)
      [[ $# -ge 2 ]] || die "--config needs a path: --config experiments/configs/NAME.yaml"
      CONFIG=$2
      shift
      ;;
    --config=*) CONFIG=${1#--config=} ;;
    -*) die "unknown option '$1'; see train.sh --help" ;;
    *=*) overrides+=("$1") ;;
    *) die "unexpected argument '$1'; config overrides look like section.key=value" ;;
  esac
  shift
done
require PROJECT ZONE TPU_NAME CONFIG
[[ -f $REPO_ROOT/$CONFIG ]] || die "config '$CONFIG' not found in $REPO_ROOT; give a path inside the repository, e.g. experiments/configs/llama2_7b_v4_16.yaml"
ckpt=$(checkpoint_uri)
data_dir=$(data_dir_uri)

train=$(quote -m llama_jax train --config "$CONFIG" train.distributed=true "checkpoint.dir=$ckpt" "data.data_dir=$data_dir" \
  ${overrides[@]+"${overrides[@]}"})
tpu_ssh all "$(remote_script \
  "mkdir -p $REMOTE_LOG_DIR" \
  "if $REMOTE_RUNNING; then echo \"training already running on \$(hostname); stop it with tpu_setup/stop.sh\" >&2; exit 1; fi" \
  "cd $REMOTE_DIR" \
  "echo \"=== \$(date -u) python $train\" >> $REMOTE_LOG" \
  "PYTHONUNBUFFERED=1 setsid nohup $REMOTE_BIN/python $train >> $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID")"
note "started on all workers; follow with tpu_setup/logs.sh"

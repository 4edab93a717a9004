#!/usr/bin/env bash
# Usage: tpu_setup/ckpt.sh [--dry-run] [--env FILE] COMMAND ARGS
#
# Copy checkpoints between this machine, the TPU VM and GCS (gcloud storage rsync: only
# changed files travel, and an interrupted copy resumes).
#
#   pull [LOCAL_DIR]             GCS_BUCKET/runs/RUN_NAME -> LOCAL_DIR (default runs/RUN_NAME)
#   push LOCAL_DIR [GCS_URI]     a local checkpoint dir (e.g. converted weights for train.init_from)
#                                -> GCS_URI (default GCS_BUCKET/models/<basename of LOCAL_DIR>)
#   from-vm REMOTE_DIR [GCS_URI] a dir on worker 0 (relative to ~/llama_jax) -> GCS_URI
#                                (default GCS_BUCKET/runs/RUN_NAME); for single-host runs that
#                                wrote checkpoints to the VM disk
#
#   --dry-run   print the gcloud commands instead of running them
#   --env FILE  settings file (default tpu_setup/tpu.env)
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
tpu_init "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
[[ $# -ge 1 && $# -le 3 ]] || die "ckpt.sh needs a command: pull [LOCAL_DIR] | push LOCAL_DIR [GCS_URI] | from-vm REMOTE_DIR [GCS_URI]"
ckpt=$(checkpoint_uri)
case $1 in
  pull)
    [[ $# -le 2 ]] || die "usage: ckpt.sh pull [LOCAL_DIR]"
    run gcloud storage rsync --recursive "$ckpt" "${2:-runs/$RUN_NAME}"
    ;;
  push)
    [[ $# -ge 2 ]] || die "usage: ckpt.sh push LOCAL_DIR [GCS_URI]"
    [[ -d $2 ]] || die "local directory '$2' not found; give the checkpoint directory to upload"
    run gcloud storage rsync --recursive "$2" "${3:-${GCS_BUCKET%/}/models/$(basename "$2")}"
    ;;
  from-vm)
    [[ $# -ge 2 ]] || die "usage: ckpt.sh from-vm REMOTE_DIR [GCS_URI]"
    tpu_ssh 0 "cd $REMOTE_DIR && gcloud storage rsync --recursive $(quote "$2" "${3:-$ckpt}")"
    ;;
  *) die "unknown command '$1'; use pull, push or from-vm (see ckpt.sh --help)" ;;
esac

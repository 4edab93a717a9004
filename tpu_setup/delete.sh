#!/usr/bin/env bash
# Usage: tpu_setup/delete.sh [--dry-run] [--env FILE] [--yes]
#
# Delete the TPU VM or pod slice TPU_NAME (with QUEUED=true: the queued resource and its node).
# gcloud asks for confirmation unless --yes is given. Copy checkpoints off first if they
# are on the VM's disk (tpu_setup/ckpt.sh from-vm); GCS checkpoints are kept.
#
#   --yes       do not ask (passes --quiet to gcloud)
#   --dry-run   print the gcloud command instead of running it
#   --env FILE  settings file (default tpu_setup/tpu.env)
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
tpu_init "$@"
quiet=()
for arg in ${ARGS[@]+"${ARGS[@]}"}; do
  case $arg in
    --yes) quiet=(--quiet) ;;
    *) die "unexpected argument '$arg'; see delete.sh --help" ;;
  esac
done
delete_command
run "${CMD[@]}" ${quiet[@]+"${quiet[@]}"}

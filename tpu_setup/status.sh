#!/usr/bin/env bash
# Usage: tpu_setup/status.sh [--dry-run] [--env FILE]
#
# Describe the queued resource (QUEUED=true: its state goes WAITING_FOR_RESOURCES -> ACTIVE)
# or the TPU VM TPU_NAME (state READY when usable).
#
#   --dry-run   print the gcloud command instead of running it
#   --env FILE  settings file (default tpu_setup/tpu.env)
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
tpu_init "$@"
no_args
require PROJECT ZONE TPU_NAME

if flag QUEUED; then
  run gcloud compute tpus queued-resources describe "$TPU_NAME" --project="$PROJECT" --zone="$ZONE"
else
  run gcloud compute tpus tpu-vm describe "$TPU_NAME" --project="$PROJECT" --zone="$ZONE"
fi

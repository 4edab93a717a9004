#!/usr/bin/env bash
# Usage: tpu_setup/create.sh [--dry-run] [--env FILE]
#
# Create the TPU VM or pod slice TPU_NAME (ACCELERATOR_TYPE, RUNTIME_VERSION in ZONE):
# on demand, as a spot VM (SPOT=true), or through a queued resource (QUEUED=true), which
# waits for capacity; check it with tpu_setup/status.sh until its state is ACTIVE.
#
#   --dry-run   print the gcloud commands instead of running them
#   --env FILE  settings file (default tpu_setup/tpu.env; see tpu.env.example)
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
tpu_init "$@"
no_args
require PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION

if flag QUEUED; then
  cmd=(gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" --project="$PROJECT"
    --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
  if [[ -n ${QUEUED_VALID_FOR:-} ]]; then
    cmd+=(--valid-until-duration="$QUEUED_VALID_FOR")
  fi
else
  cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE"
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
fi
if flag SPOT; then
  cmd+=(--spot)
fi
run "${cmd[@]}"
if flag QUEUED; then
  note "queued: run tpu_setup/status.sh until the state is ACTIVE, then tpu_setup/setup.sh"
fi

#!/usr/bin/env bash
# Usage: tpu_setup/create.sh [--dry-run] [--env FILE]
#
# Create the TPU VM or pod slice TPU_NAME (ACCELERATOR_TYPE, RUNTIME_VERSION in ZONE):
# on demand, as a spot VM (SPOT=true), or through a queued resource (QUEUED=true), which
# waits for capacity; check it with tpu_setup/status.sh until its state is ACTIVE.
# NETWORK / SUBNET / INTERNAL_IPS / SERVICE_ACCOUNT are passed on when set. After a spot
# preemption the name is still taken: use tpu_setup/recover.sh, not create.sh.
#
#   --dry-run   print the gcloud commands instead of running them
#   --env FILE  settings file (default tpu_setup/tpu.env; see tpu.env.example)
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
tpu_init "$@"
no_args
create_command
run "${CMD[@]}"
if flag QUEUED; then
  note "queued: run tpu_setup/status.sh until the state is ACTIVE, then tpu_setup/setup.sh"
fi

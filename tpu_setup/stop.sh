#!/usr/bin/env bash
# Usage: tpu_setup/stop.sh [--dry-run] [--env FILE]
#
# Stop the training that train.sh started, on every worker (SIGTERM to its process group).
#
#   --dry-run   print the gcloud command instead of running it
#   --env FILE  settings file (default tpu_setup/tpu.env)
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
tpu_init "$@"
no_args
tpu_ssh all "if $REMOTE_RUNNING; then kill -TERM -- \"-\$(cat $REMOTE_PID)\" && echo \"stopped training on \$(hostname)\"; else echo \"no training running on \$(hostname)\"; fi"

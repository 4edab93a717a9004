#!/usr/bin/env bash
# Usage: tpu_setup/logs.sh [--dry-run] [--env FILE] [--worker N|all] [--lines N] [--no-follow]
#
# Show the training log (~/llama_jax_logs/train.log) of worker 0, another worker, or all of
# them, and keep following it (Ctrl-C stops following; training goes on).
#
#   --worker N|all  which worker (default 0, the one that prints metrics)
#   --lines N       lines of history to show first (default 100)
#   --no-follow     print and exit
#   --dry-run       print the gcloud command instead of running it
#   --env FILE      settings file (default tpu_setup/tpu.env)
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
tpu_init "$@"
worker=0
lines=100
follow=" -F"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  case $1 in
    --worker | --lines)
      [[ $# -ge 2 ]] || die "$1 needs a value; see logs.sh --help"
      if [[ $1 == --worker ]]; then worker=$2; else lines=$2; fi
      shift
      ;;
    --worker=*) worker=${1#--worker=} ;;
    --lines=*) lines=${1#--lines=} ;;
    --no-follow) follow="" ;;
    *) die "unexpected argument '$1'; see logs.sh --help" ;;
  esac
  shift
done
[[ $worker =~ ^([0-9]+|all)$ ]] || die "--worker must be a worker number or 'all', got '$worker'"
[[ $lines =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$lines'"
tpu_ssh "$worker" "tail -n $lines$follow $REMOTE_LOG"

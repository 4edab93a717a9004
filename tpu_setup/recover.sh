#!/usr/bin/env bash
# Usage: tpu_setup/recover.sh [--dry-run --state STATE] [--env FILE]
#
# Bring back TPU_NAME after a spot preemption. A preempted TPU VM keeps its name in state
# PREEMPTED, and a queued resource whose VMs were preempted turns SUSPENDED (or FAILED): neither
# restarts, and create.sh cannot reuse the name. recover.sh reads the state and, in those states,
# deletes the slice (queued: `queued-resources delete --force`, which removes its VMs too) and
# creates it again exactly as create.sh does; a slice that is gone (NOT_FOUND) is just created,
# and any other state is left alone. Then run setup.sh and train.sh again: training resumes from
# the newest checkpoint in GCS_BUCKET/runs/RUN_NAME.
#
#   --state STATE  with --dry-run: the state to act on, since a dry run asks gcloud nothing
#                  (PREEMPTED, TERMINATED, SUSPENDED, FAILED, NOT_FOUND, READY, ACTIVE, ...)
#   --dry-run      print the gcloud commands instead of running them
#   --env FILE     settings file (default tpu_setup/tpu.env)
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
tpu_init "$@"
state=""
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  case $1 in
    --state)
      [[ $# -ge 2 ]] || die "--state needs a value, e.g. --state PREEMPTED"
      state=$2
      shift
      ;;
    --state=*) state=${1#--state=} ;;
    *) die "unexpected argument '$1'; see recover.sh --help" ;;
  esac
  shift
done
require PROJECT ZONE TPU_NAME
if [[ $DRY_RUN -eq 1 ]]; then
  [[ -n $state ]] || die "a dry run cannot ask gcloud for the state; add --state PREEMPTED (or SUSPENDED, NOT_FOUND, READY, ...)"
else
  [[ -z $state ]] || die "--state is only for --dry-run; recover.sh reads the real state from gcloud"
fi

if flag QUEUED; then
  describe=(gcloud compute tpus queued-resources describe "$TPU_NAME" --project="$PROJECT" --zone="$ZONE"
    --format="value(state.state)")
else
  describe=(gcloud compute tpus tpu-vm describe "$TPU_NAME" --project="$PROJECT" --zone="$ZONE"
    --format="value(state)")
fi
query state "$state" "${describe[@]}" || state=NOT_FOUND
note "$TPU_NAME: $state"
case $state in
  PREEMPTED | TERMINATED | SUSPENDED | FAILED)
    delete_command
    run "${CMD[@]}" --quiet
    ;;
  NOT_FOUND) ;;
  *)
    note "nothing to recover: $TPU_NAME is $state (tpu_setup/status.sh shows it; delete.sh removes it)"
    exit 0
    ;;
esac
create_command
run "${CMD[@]}"
note "recreated $TPU_NAME; when it is READY/ACTIVE run tpu_setup/setup.sh, then tpu_setup/train.sh (it resumes)"

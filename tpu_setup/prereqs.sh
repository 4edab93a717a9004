#!/usr/bin/env bash
# Usage: tpu_setup/prereqs.sh [--dry-run] [--env FILE]
#
# One-time preparation of a project for TPU training (safe to rerun):
#   1. enable the Cloud TPU API (tpu.googleapis.com)
#   2. create the bucket of GCS_BUCKET in ZONE's region, unless it exists
#   3. give the TPU VMs' service account object access to that bucket (roles/storage.objectAdmin):
#      SERVICE_ACCOUNT, or by default the project's Compute Engine default service account
#      (PROJECT_NUMBER-compute@developer.gserviceaccount.com), which TPU VMs run as
#   4. make the ssh key gcloud uses (~/.ssh/google_compute_engine) if it is missing, and add it to
#      the running ssh agent: ssh to all workers at once (--worker=all) needs it there
#
#   --dry-run   print the commands instead of running them
#   --env FILE  settings file (default tpu_setup/tpu.env)
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
tpu_init "$@"
no_args
require PROJECT ZONE
check_bucket
bucket=${BUCKET#gs://}
bucket=gs://${bucket%%/*} # the bucket itself, whatever prefix GCS_BUCKET adds

run gcloud services enable tpu.googleapis.com --project="$PROJECT"
if [[ $DRY_RUN -eq 0 ]] && gcloud storage buckets describe "$bucket" --project="$PROJECT" > /dev/null 2>&1; then
  note "bucket $bucket exists"
else
  run gcloud storage buckets create "$bucket" --project="$PROJECT" --location="${ZONE%-*}" --uniform-bucket-level-access
fi
account=${SERVICE_ACCOUNT:-}
if [[ -z $account ]]; then
  number=""
  query number PROJECT_NUMBER gcloud projects describe "$PROJECT" --format="value(projectNumber)"
  account="$number-compute@developer.gserviceaccount.com"
fi
run gcloud storage buckets add-iam-policy-binding "$bucket" --member="serviceAccount:$account" \
  --role=roles/storage.objectAdmin

key="$HOME/.ssh/google_compute_engine"
if [[ ! -f $key ]]; then
  run ssh-keygen -t rsa -f "$key"
fi
if [[ $DRY_RUN -eq 0 && -z ${SSH_AUTH_SOCK:-} ]]; then
  die "no ssh agent is running; start one in this shell with: eval \"\$(ssh-agent -s)\", then rerun prereqs.sh"
fi
run ssh-add "$key"

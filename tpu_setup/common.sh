# shellcheck shell=bash disable=SC2034  # the constants below are read by the scripts that source this file
# Shared logic of the tpu_setup scripts: common options, the env file, quoting, and the one `run` helper.
# Sourced, never executed. A script calls `tpu_init "$@"` and then reads its own arguments from ARGS.
# Kept to bash 3.2 features (macOS) and safe under `set -euo pipefail`.

TPU_SETUP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$TPU_SETUP_DIR")"
DRY_RUN=0
ENV_FILE="$TPU_SETUP_DIR/tpu.env"
ARGS=()
CMD=()
BUCKET=""

# Every setting the env file may hold; they are cleared before it is read so only the file counts.
SETTINGS="PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION SPOT QUEUED QUEUED_VALID_FOR NETWORK SUBNET
INTERNAL_IPS SERVICE_ACCOUNT GCS_BUCKET RUN_NAME DATASET DATASET_SOURCE REPO BRANCH CONFIG TOKENIZER_URI PYTHON_VERSION
JAX_VERSION"

# Fixed paths on every worker, relative to the login user's home directory.
REMOTE_DIR=llama_jax
REMOTE_VENV=llama_jax_venv
REMOTE_BIN="\$HOME/$REMOTE_VENV/bin"  # expanded by the remote shell
REMOTE_LOG_DIR=llama_jax_logs
REMOTE_LOG="\$HOME/$REMOTE_LOG_DIR/train.log"
REMOTE_PID="\$HOME/$REMOTE_LOG_DIR/train.pid"
REMOTE_TARBALL=llama_jax_src.tar.gz
# Remote test: is the training started by train.sh still alive on this worker?
REMOTE_RUNNING="[ -f $REMOTE_PID ] && kill -0 \"\$(cat $REMOTE_PID)\" 2>/dev/null"

die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

note() {
  printf '%s\n' "$*" >&2
}

usage() {
  # The script's header comment (line 2 up to the first non-comment line) is its help text.
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

tpu_init() {
  while [[ $# -gt 0 ]]; do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      --env)
        [[ $# -ge 2 ]] || die "--env needs a file: --env tpu_setup/tpu.env"
        ENV_FILE=$2
        shift
        ;;
      --env=*) ENV_FILE=${1#--env=} ;;
      -h | --help)
        usage
        exit 0
        ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
  load_env
}

load_env() {
  [[ -f $ENV_FILE ]] || die "env file '$ENV_FILE' not found; copy tpu_setup/tpu.env.example to tpu_setup/tpu.env and fill it in, or pass --env FILE"
  # shellcheck disable=SC2086  # word-splitting the list of names is intended
  unset $SETTINGS
  # shellcheck source=tpu.env.example
  . "$ENV_FILE"
  SPOT=${SPOT:-false}
  QUEUED=${QUEUED:-false}
  INTERNAL_IPS=${INTERNAL_IPS:-false}
  DATASET=${DATASET:-c4/en/3.0.1}
  DATASET_SOURCE=${DATASET_SOURCE:-gs://allennlp-tensorflow-datasets}
  BRANCH=${BRANCH:-main}
  PYTHON_VERSION=${PYTHON_VERSION:-3.11}
  JAX_VERSION=${JAX_VERSION:-0.10.2}
  RUN_NAME=${RUN_NAME:-${TPU_NAME:-}}
}

require() {
  # Fail with one line naming every missing setting.
  local name missing=""
  for name in "$@"; do
    [[ -n ${!name:-} ]] || missing="$missing $name"
  done
  [[ -z $missing ]] || die "missing setting(s)${missing} in $ENV_FILE; set them (see tpu_setup/tpu.env.example)"
}

flag() {
  # True/false settings such as SPOT=true; anything else is an error, not a silent "false".
  case ${!1:-false} in
    true | 1 | yes) return 0 ;;
    false | 0 | no) return 1 ;;
    *) die "$1 must be true or false, got '${!1}' (in $ENV_FILE)" ;;
  esac
}

check_bucket() {
  # Set BUCKET to GCS_BUCKET without a trailing slash, or fail if it is not a gs:// URI.
  require GCS_BUCKET
  [[ $GCS_BUCKET == gs://* ]] || die "GCS_BUCKET must look like gs://my-bucket, got '$GCS_BUCKET' (in $ENV_FILE)"
  BUCKET=${GCS_BUCKET%/}
}

checkpoint_uri() {
  check_bucket
  require RUN_NAME
  printf '%s/runs/%s\n' "$BUCKET" "$RUN_NAME"
}

data_dir_uri() {
  # The TFDS data_dir every worker reads: GCS_BUCKET/tensorflow_datasets.
  check_bucket
  printf '%s/tensorflow_datasets\n' "$BUCKET"
}

no_args() {
  [[ ${#ARGS[@]} -eq 0 ]] || die "unexpected argument '${ARGS[0]}'; see $(basename "$0") --help"
}

quote() {
  # Print the arguments as one line a POSIX shell reads back into the same words.
  local arg out="" safe='^[A-Za-z0-9_./:=@,+%-]+$'
  for arg in "$@"; do
    if [[ $arg =~ $safe ]]; then
      out="$out $arg"
    else
      out="$out '$(printf '%s' "$arg" | sed "s/'/'\\\\''/g")'"
    fi
  done
  printf '%s\n' "${out# }"
}

query() {
  # query VAR DRY_ANSWER COMMAND...: set VAR to COMMAND's output. A dry run prints COMMAND (stdout) and sets
  # DRY_ANSWER instead, since it asks gcloud nothing. Fails when COMMAND fails.
  local var=$1 answer=$2 out
  shift 2
  if [[ $DRY_RUN -eq 1 ]]; then
    quote "$@"
    out=$answer
  else
    note "+ $(quote "$@")"
    out=$("$@") || return 1
  fi
  printf -v "$var" '%s' "$out"
}

run() {
  # The single place commands run: with --dry-run they are printed (stdout), otherwise echoed to stderr and run.
  if [[ $DRY_RUN -eq 1 ]]; then
    quote "$@"
  else
    note "+ $(quote "$@")"
    "$@"
  fi
}

ssh_flags() {
  # Extra flags for tpu-vm ssh/scp: workers without external IPs are reached on their internal ones (from a
  # machine inside the VPC).
  if flag INTERNAL_IPS; then
    printf '%s\n' --internal-ip
  fi
}

tpu_ssh() {
  # tpu_ssh WORKER COMMAND: run COMMAND (a remote shell line) on one worker, a list, or `all`.
  require PROJECT ZONE TPU_NAME
  local extra
  extra=$(ssh_flags)
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker="$1" \
    ${extra:+"$extra"} --command="$2"
}

create_command() {
  # Set CMD to the gcloud command that creates TPU_NAME: a TPU VM (on demand or SPOT) or a queued resource.
  require PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION
  if flag QUEUED; then
    CMD=(gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" --project="$PROJECT"
      --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
    if [[ -n ${QUEUED_VALID_FOR:-} ]]; then
      CMD+=(--valid-until-duration="$QUEUED_VALID_FOR")
    fi
  else
    CMD=(gcloud compute tpus tpu-vm create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE"
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  fi
  if [[ -n ${NETWORK:-} ]]; then
    CMD+=(--network="$NETWORK")
  fi
  if [[ -n ${SUBNET:-} ]]; then
    CMD+=(--subnetwork="$SUBNET")
  fi
  if flag INTERNAL_IPS; then
    CMD+=(--internal-ips)
  fi
  if [[ -n ${SERVICE_ACCOUNT:-} ]]; then
    CMD+=(--service-account="$SERVICE_ACCOUNT")
  fi
  if flag SPOT; then
    CMD+=(--spot)
  fi
}

delete_command() {
  # Set CMD to the gcloud command that deletes TPU_NAME (a queued resource with --force: its VMs too).
  require PROJECT ZONE TPU_NAME
  if flag QUEUED; then
    CMD=(gcloud compute tpus queued-resources delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --force)
  else
    CMD=(gcloud compute tpus tpu-vm delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE")
  fi
}

remote_script() {
  # Join remote shell steps into the one line that `gcloud ... ssh --command` takes.
  local step out=""
  for step in "$@"; do
    out="${out:+$out; }$step"
  done
  printf '%s\n' "$out"
}

#!/usr/bin/env bash
# Usage: tpu_setup/setup.sh [--dry-run] [--env FILE]
#
# Install the project on every worker of TPU_NAME: clone REPO at BRANCH into ~/llama_jax
# (or, with REPO empty, copy the local checkout's git HEAD), create the venv ~/llama_jax_venv
# with Python PYTHON_VERSION (via uv), run `pip install -r requirements.txt -e . "jax[tpu]==JAX_VERSION"`
# (one resolve, so pip cannot pick a jax for requirements.txt that libtpu does not match), and copy
# TOKENIZER_URI (if set) to ~/llama_jax/tokenizer.model. Safe to rerun: an existing clone is
# fast-forwarded.
#
#   --dry-run   print the gcloud commands instead of running them
#   --env FILE  settings file (default tpu_setup/tpu.env)
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
tpu_init "$@"
no_args
require PROJECT ZONE TPU_NAME PYTHON_VERSION JAX_VERSION

dir=$(quote "$REMOTE_DIR")
if [[ -n ${REPO:-} ]]; then
  fetch="if [ -d $dir/.git ]; then git -C $dir pull --ff-only; else git clone --branch $(quote "$BRANCH") $(quote "$REPO") $dir; fi"
else
  tarball="${TMPDIR:-/tmp}/llama_jax_${TPU_NAME}.tar.gz"
  run git -C "$REPO_ROOT" archive --format=tar.gz --output="$tarball" HEAD
  extra=$(ssh_flags)
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$REMOTE_TARBALL" --project="$PROJECT" --zone="$ZONE" \
    --worker=all ${extra:+"$extra"}
  fetch="mkdir -p $dir && tar -xzf $REMOTE_TARBALL -C $dir"
fi
venv=$(quote "$REMOTE_VENV")
steps=(
  "set -e"
  "$fetch"
  "python3 -m pip install --user --quiet uv"
  "\$HOME/.local/bin/uv venv --seed --allow-existing --python $(quote "$PYTHON_VERSION") $venv"
  "cd $dir"
  "$REMOTE_BIN/pip install -r requirements.txt -e . $(quote "jax[tpu]==$JAX_VERSION")"
)
if [[ -n ${TOKENIZER_URI:-} ]]; then
  steps+=("gcloud storage cp $(quote "$TOKENIZER_URI") tokenizer.model")
fi
steps+=("$REMOTE_BIN/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'")
tpu_ssh all "$(remote_script "${steps[@]}")"

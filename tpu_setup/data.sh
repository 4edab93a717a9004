#!/usr/bin/env bash
# Usage: tpu_setup/data.sh [--dry-run] [--env FILE] COMMAND ARGS
#
# Put what training reads into GCS_BUCKET, once, before the first train.sh:
#
#   dataset            copy the prepared TFDS dataset DATASET (default c4/en/3.0.1) from
#                      DATASET_SOURCE (default gs://allennlp-tensorflow-datasets, a requester-pays
#                      bucket billed to PROJECT; C4 en is about 800 GB) to
#                      GCS_BUCKET/tensorflow_datasets/DATASET, where train.sh points data.data_dir.
#                      Training never builds C4 itself (the recipes set data.allow_download=false).
#   tokenizer FILE     upload a local sentencepiece model (LLaMA 2's tokenizer.model from Meta)
#                      to TOKENIZER_URI, which setup.sh copies to every worker
#
#   --dry-run   print the gcloud commands instead of running them
#   --env FILE  settings file (default tpu_setup/tpu.env)
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
tpu_init "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
[[ $# -ge 1 ]] || die "data.sh needs a command: dataset | tokenizer FILE"
case $1 in
  dataset)
    [[ $# -eq 1 ]] || die "usage: data.sh dataset (DATASET and DATASET_SOURCE come from $ENV_FILE)"
    require PROJECT
    data_dir=$(data_dir_uri)
    run gcloud storage cp -r --billing-project="$PROJECT" "${DATASET_SOURCE%/}/$DATASET" \
      "$data_dir/$(dirname "$DATASET")/"
    ;;
  tokenizer)
    [[ $# -eq 2 ]] || die "usage: data.sh tokenizer FILE (a local tokenizer.model)"
    [[ -f $2 ]] || die "tokenizer file '$2' not found; give the local sentencepiece .model to upload"
    require TOKENIZER_URI
    run gcloud storage cp "$2" "$TOKENIZER_URI"
    ;;
  *) die "unknown command '$1'; use dataset or tokenizer FILE (see data.sh --help)" ;;
esac

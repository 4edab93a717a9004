#!/usr/bin/env bash
# Issue 12's GPU table end to end on one H100/H200, in about 5 minutes, with no network:
#   attention kernel check, train step (llama2-7b shapes, 8 layers, batch 4 x 4096, bf16 compute, fp32 params,
#   full remat, AdamW) against HF torch, decode of the full llama2-7b in bf16 at batch 1 (prompt 128) against HF
#   generate with a static cache, the same at batch 16 on its own (in one 150 s section with its HF peer it did not
#   finish on an H200), random init of llama2-7b, the train step saving every projection's output (`--remat
#   save_dots`: no projection recomputed; the table compares it with the HF row of the same shape), the train step
#   with the XLA attention baseline, and last, if time is left, batch-16 decoding sampled at Meta's chat defaults
#   (temperature 0.6, top_p 0.9: the draw and the nucleus's halvings on the GPU).
# Each section is its own python process under `timeout`, so one failure or hang costs only that row; a section
# that would start after the time budget (GPU_CHECK_BUDGET_S, default 340 s) is skipped. The table comes last.
#   experiments/gpu_check.sh            # on the GPU machine (jax+CUDA, flax, optax, torch, transformers installed)
#   experiments/gpu_check.sh --smoke    # tiny shapes on any machine (what the CPU test runs)
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
PY="${PYTHON:-python}"
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
BUDGET="${GPU_CHECK_BUDGET_S:-340}"
RESULTS="$(mktemp)"
START=$(date +%s)

section() {  # section NAME LIMIT_S SCRIPT ARGS...
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - $(date +%s) + START))
  if [ "$left" -lt 20 ]; then
    echo "== $name: SKIPPED (time budget spent)"
    echo "{\"kind\": \"skipped\", \"name\": \"$name\"}" >> "$RESULTS"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s, $(( $(date +%s) - START )) s elapsed)"
  timeout --kill-after=10 "$limit" "$PY" -u "$@" --json "$RESULTS" 2>&1 | grep -v -E "^(WARNING|I0000|W0000)"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "== $name: FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))"
    echo "{\"kind\": \"failed\", \"name\": \"$name\", \"rc\": $rc}" >> "$RESULTS"
  fi
}

date -u +"%Y-%m-%d %H:%M UTC"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, jax.devices()[0].device_kind,
'| flax', flax.__version__, '| optax', optax.__version__, '| torch', torch.__version__, '| transformers',
transformers.__version__)" 2>&1 | tail -1

if [ "$SMOKE" = 1 ]; then
  MODEL=(--models tiny --layers 2)
  section attention 300 experiments/check_attention.py --impls splash --batch 1 --seq 128 --heads 4 --kv-heads 2 --head-dim 16
  section train 300 experiments/bench_train.py "${MODEL[@]}" --batch 2 --seq 64 --steps 1 --warmup 1 --dtype bfloat16 --remat full --scan --compare-torch
  section decode 300 experiments/bench_decode.py --models tiny --layers 2 --batch-sizes 1 --prompt-len 8 --new-tokens 3 --repeats 1 --compare-torch
  section decode-b16 300 experiments/bench_decode.py --models tiny --layers 2 --batch-sizes 4 --prompt-len 8 --new-tokens 3 --repeats 1
  section init 300 experiments/bench_init.py --preset tiny --layers 2
  section train-save-dots 300 experiments/bench_train.py "${MODEL[@]}" --batch 2 --seq 64 --steps 1 --warmup 1 --dtype bfloat16 --remat save_dots --scan
  section train-xla 300 experiments/bench_train.py "${MODEL[@]}" --batch 2 --seq 64 --steps 1 --warmup 1 --dtype bfloat16 --remat full --scan --attention xla
  section decode-sampled 300 experiments/bench_decode.py --models tiny --layers 2 --batch-sizes 4 --prompt-len 8 --new-tokens 3 --repeats 1 --temperature 0.6 --top-p 0.9
else
  MODEL=(--models llama2-7b --layers 8)
  section attention 60 experiments/check_attention.py --impls cudnn --batch 1 --seq 4096 --heads 32 --kv-heads 8 --head-dim 128
  section train 150 experiments/bench_train.py "${MODEL[@]}" --batch 4 --seq 4096 --steps 5 --warmup 2 --dtype bfloat16 --remat full --scan --compare-torch
  section decode 120 experiments/bench_decode.py --models llama2-7b --batch-sizes 1 --prompt-len 128 --new-tokens 128 --repeats 2 --dtype bfloat16 --compare-torch
  section decode-b16 80 experiments/bench_decode.py --models llama2-7b --batch-sizes 16 --prompt-len 128 --new-tokens 128 --repeats 2 --dtype bfloat16
  section init 60 experiments/bench_init.py --preset llama2-7b
  section train-save-dots 75 experiments/bench_train.py "${MODEL[@]}" --batch 4 --seq 4096 --steps 5 --warmup 2 --dtype bfloat16 --remat save_dots --scan
  section train-xla 90 experiments/bench_train.py "${MODEL[@]}" --batch 4 --seq 4096 --steps 3 --warmup 1 --dtype bfloat16 --remat full --scan --attention xla
  section decode-sampled 80 experiments/bench_decode.py --models llama2-7b --batch-sizes 16 --prompt-len 128 --new-tokens 128 --repeats 2 --dtype bfloat16 --temperature 0.6 --top-p 0.9
fi

echo "== table ($(( $(date +%s) - START )) s)"
"$PY" experiments/gpu_table.py "$RESULTS"
rm -f "$RESULTS"

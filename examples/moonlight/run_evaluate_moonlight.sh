#!/usr/bin/env bash
# The seed's evaluation step (convert the trained checkpoint to Hugging Face, then evaluate cmmlu and
# ceval-valid), with moonforge's converter and lm-eval model class.
#
#   bash run_evaluate_moonlight.sh CKPT_PATH HF_OUT_PATH DATA_DIR [TASKS] [NUM_FEWSHOT] [OUTPUT]
#
#   CKPT_PATH     moonforge checkpoint written by training (root or an iter_* directory)
#   HF_OUT_PATH   where the Hugging Face export goes (skipped when it already holds config.json)
#   DATA_DIR      DATA_DIR/cmmlu/{dev,test}/<subject>.csv and DATA_DIR/ceval/{dev,val}/<subject>_{dev,val}.csv
#   TASKS         default cmmlu,ceval-valid
#   NUM_FEWSHOT   default 0 (the seed's setting); 5 matches the published numbers
#   OUTPUT        results JSON (default HF_OUT_PATH/eval/results.json); the table goes next to it as .md
#   BATCH_SIZE    (environment) default 16, as in the seed
#   NPROC         (environment) processes, one GPU each (default: all visible GPUs); data parallel like the
#                 seed's `accelerate launch`
#
# Example:
#   bash run_evaluate_moonlight.sh /workspace/output_mcore_moonlight_finetune/checkpoint \
#        /mnt/moonlight-ckpts/Moonlight-16B-A3B-Instruct-mcore-to-hf /workspace/eval-data
set -euo pipefail

usage() {
    sed -n '2,19p' "$0" >&2
    exit 2
}

if [ $# -lt 3 ] || [ $# -gt 6 ]; then
    echo "error: expected 3 to 6 arguments, got $#" >&2
    usage
fi

CKPT_PATH=$1
HF_OUT_PATH=$2
DATA_DIR=$3
TASKS=${4:-cmmlu,ceval-valid}
NUM_FEWSHOT=${5:-0}
OUTPUT=${6:-$HF_OUT_PATH/eval/results.json}
BATCH_SIZE=${BATCH_SIZE:-16}

if [ ! -d "$DATA_DIR" ]; then
    echo "error: DATA_DIR '$DATA_DIR' is not a directory" >&2
    exit 2
fi
if command -v moonforge >/dev/null 2>&1; then
    MOONFORGE=(moonforge)
else
    MOONFORGE=(python3 -m moonforge.cli)
fi

if [ -f "$HF_OUT_PATH/config.json" ]; then
    echo "using the existing export $HF_OUT_PATH"
else
    "${MOONFORGE[@]}" convert native-to-hf --ckpt "$CKPT_PATH" --out "$HF_OUT_PATH" --dtype bf16
fi

NPROC=${NPROC:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}
EVAL_ARGS=(eval --model "$HF_OUT_PATH" --tasks "$TASKS" --data-dir "$DATA_DIR" --num-fewshot "$NUM_FEWSHOT"
           --batch-size "$BATCH_SIZE" --output "$OUTPUT")
if [ "$NPROC" -gt 1 ]; then
    exec torchrun --standalone --nproc-per-node "$NPROC" -m moonforge.cli "${EVAL_ARGS[@]}"
fi
exec "${MOONFORGE[@]}" "${EVAL_ARGS[@]}"

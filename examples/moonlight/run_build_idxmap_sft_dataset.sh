#!/usr/bin/env bash
# SFT data for Moonlight, with the positional arguments of Pai-Megatron-Patch's
# toolkits/sft_data_preprocessing/run_build_idxmap_sft_dataset.sh:
#
#   run_build_idxmap_sft_dataset.sh INPUT_JSON TOKENIZER_NAME SEQ_LEN OUTPUT_PREFIX HF_MODEL_DIR [packing]
#
# Writes the SFT idxmap OUTPUT_PREFIX_text_document.* (tokens, loss masks, metadata; see docs/data.md) through
# `moonforge data sft`: alpaca, messages or ShareGPT records rendered with Moonlight's chat template, loss on the
# assistant replies only. The 6th argument, true or false (default), packs several samples per row with their
# boundaries kept. When OUTPUT_PREFIX is a directory, the prefix OUTPUT_PREFIX/mmap_moonlight_sft_datasets is used.
# TOKENIZER_NAME is checked but the tokenizer is read from HF_MODEL_DIR.
# Environment: MOONFORGE_DATA_WORKERS (tokenizer processes; default: CPU cores, at most 8, as Pai's 8).
set -euo pipefail

usage() {
  echo "usage: $0 INPUT_JSON TOKENIZER_NAME SEQ_LEN OUTPUT_PREFIX HF_MODEL_DIR [packing: true|false]" >&2
  exit 2
}
[ $# -ge 5 ] && [ $# -le 6 ] || usage

INPUT_JSON=$1
TOKENIZER_NAME=$2
SEQ_LEN=$3
OUTPUT_PREFIX=$4
HF_MODEL_DIR=$5
PACKING=${6:-false}

if [ "$TOKENIZER_NAME" != "DeepSeekV2Tokenizer" ]; then
  echo "error: TOKENIZER_NAME must be DeepSeekV2Tokenizer, the name Pai-Megatron-Patch gives Moonlight's tokenizer" \
       "(got '$TOKENIZER_NAME'); the tokenizer itself is read from HF_MODEL_DIR" >&2
  exit 2
fi
case "$SEQ_LEN" in ''|*[!0-9]*) echo "error: SEQ_LEN must be a positive integer, got '$SEQ_LEN'" >&2; exit 2 ;; esac
case "$PACKING" in
  true) packing_option=(--packing) ;;
  false) packing_option=() ;;
  *) echo "error: the 6th argument (packing) must be true or false, got '$PACKING'" >&2; exit 2 ;;
esac
if [ -d "$OUTPUT_PREFIX" ] || [ "${OUTPUT_PREFIX%/}" != "$OUTPUT_PREFIX" ]; then
  OUTPUT_PREFIX="${OUTPUT_PREFIX%/}/mmap_moonlight_sft_datasets"
  echo "OUTPUT_PREFIX is a directory; writing ${OUTPUT_PREFIX}_text_document.*"
fi

cores=$(nproc 2>/dev/null || echo 1)
WORKERS=${MOONFORGE_DATA_WORKERS:-$(( cores < 8 ? cores : 8 ))}
MOONFORGE=${MOONFORGE:-moonforge}

mkdir -p "$(dirname "$OUTPUT_PREFIX")"
start=$SECONDS
$MOONFORGE data sft \
  --input "$INPUT_JSON" \
  --tokenizer "$HF_MODEL_DIR" \
  --seq-len "$SEQ_LEN" \
  --output-prefix "$OUTPUT_PREFIX" \
  --workers "$WORKERS" \
  ${packing_option[@]+"${packing_option[@]}"}
elapsed=$(( SECONDS - start ))
echo "$(( elapsed / 60 )) min $(( elapsed % 60 )) sec"

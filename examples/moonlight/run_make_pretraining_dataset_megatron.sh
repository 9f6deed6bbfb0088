#!/usr/bin/env bash
# Pretraining data for Moonlight, with the positional arguments of Pai-Megatron-Patch's
# toolkits/pretrain_data_preprocessing/run_make_pretraining_dataset_megatron.sh:
#
#   run_make_pretraining_dataset_megatron.sh INPUT_JSON TOKENIZER_NAME JSON_KEY OUTPUT_DIR HF_MODEL_DIR [DATASET_NAME]
#
# Writes OUTPUT_DIR/mmap_moonlight_datasets_<JSON_KEY>_document.{bin,idx} (for JSON_KEY=text, the
# mmap_moonlight_datasets_text_document prefix the seed's training commands use), one document per record with
# [EOS] appended, through `moonforge data pretrain`. TOKENIZER_NAME is checked but the tokenizer itself is read
# from HF_MODEL_DIR (tiktoken.model + tokenizer_config.json, or tokenizer.json). DATASET_NAME is accepted for
# compatibility and unused (Pai uses it only for GPT-2 tokenizers).
# Environment: MOONFORGE_DATA_WORKERS (tokenizer processes; default: CPU cores, at most 8, as Pai's 8).
set -euo pipefail

usage() {
  echo "usage: $0 INPUT_JSON TOKENIZER_NAME JSON_KEY OUTPUT_DIR HF_MODEL_DIR [DATASET_NAME]" >&2
  exit 2
}
[ $# -ge 5 ] && [ $# -le 6 ] || usage

INPUT_JSON=$1
TOKENIZER_NAME=$2
JSON_KEY=$3
OUTPUT_DIR=$4
HF_MODEL_DIR=$5

if [ "$TOKENIZER_NAME" != "DeepSeekV2Tokenizer" ]; then
  echo "error: TOKENIZER_NAME must be DeepSeekV2Tokenizer, the name Pai-Megatron-Patch gives Moonlight's tokenizer" \
       "(got '$TOKENIZER_NAME'); the tokenizer itself is read from HF_MODEL_DIR" >&2
  exit 2
fi
if [ ! -d "$HF_MODEL_DIR" ]; then
  echo "error: HF_MODEL_DIR '$HF_MODEL_DIR' is not a directory (it must hold Moonlight's tokenizer files)" >&2
  exit 2
fi

cores=$(nproc 2>/dev/null || echo 1)
WORKERS=${MOONFORGE_DATA_WORKERS:-$(( cores < 8 ? cores : 8 ))}
MOONFORGE=${MOONFORGE:-moonforge}

mkdir -p "$OUTPUT_DIR"
start=$SECONDS
$MOONFORGE data pretrain \
  --input "$INPUT_JSON" \
  --tokenizer "$HF_MODEL_DIR" \
  --json-keys "$JSON_KEY" \
  --output-prefix "${OUTPUT_DIR%/}/mmap_moonlight_datasets" \
  --workers "$WORKERS" \
  --append-eod
elapsed=$(( SECONDS - start ))
echo "$(( elapsed / 60 )) min $(( elapsed % 60 )) sec"

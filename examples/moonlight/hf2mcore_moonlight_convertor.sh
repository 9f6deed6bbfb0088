#!/usr/bin/env bash
# Pai-Megatron-Patch's Moonlight converter command line, running moonforge's converter.
#
#   bash hf2mcore_moonlight_convertor.sh MODEL_SIZE SOURCE_CKPT_PATH TARGET_CKPT_PATH TP PP ETP EP PR mg2hf [HF_CKPT_PATH]
#
#   MODEL_SIZE     A3B (the architecture itself is read from the source's config.json)
#   TP PP ETP EP   parallel layout: checked against the model and recorded; moonforge checkpoints are
#                  layout-independent, so any layout can later load the result
#   PR             fp16 | bf16 | fp32: weight dtype of the output (the router bias stays fp32)
#   mg2hf          false: Hugging Face -> moonforge checkpoint   (moonforge convert hf-to-native)
#                  true:  moonforge checkpoint -> Hugging Face   (moonforge convert native-to-hf)
#   HF_CKPT_PATH   with mg2hf=true: the original HF directory, whose tokenizer files go into the export
#   MP_PP0_LAYERS  (environment) layers of the first pipeline stage, for an uneven split (needs PP > 1)
#
# Example (the seed's first conversion):
#   bash hf2mcore_moonlight_convertor.sh A3B /mnt/moonlight-ckpts/Moonlight-16B-A3B-Instruct \
#        /mnt/moonlight-ckpts/Moonlight-16B-A3B-Instruct-to-mcore-tp1-pp1-etp1-ep8 1 1 1 8 bf16 false
set -euo pipefail

usage() {
    sed -n '2,16p' "$0" >&2
    exit 2
}

if [ $# -lt 9 ] || [ $# -gt 10 ]; then
    echo "error: expected 9 or 10 arguments, got $#" >&2
    usage
fi

MODEL_SIZE=$1
SOURCE_CKPT_PATH=$2
TARGET_CKPT_PATH=$3
TP=$4
PP=$5
ETP=$6
EP=$7
PR=$8
MG2HF=$9
HF_CKPT_PATH=${10:-}

if [ "$MODEL_SIZE" != "A3B" ]; then
    echo "error: MODEL_SIZE is '$MODEL_SIZE'; only A3B (Moonlight-16B-A3B) is defined" >&2
    exit 2
fi
case "$PR" in
    fp16|bf16|fp32) ;;
    *) echo "error: PR is '$PR'; use fp16, bf16 or fp32" >&2; exit 2 ;;
esac
for pair in "TP=$TP" "PP=$PP" "ETP=$ETP" "EP=$EP"; do
    if ! [[ "${pair#*=}" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: ${pair%%=*} is '${pair#*=}'; it must be a positive integer" >&2
        exit 2
    fi
done

if command -v moonforge >/dev/null 2>&1; then
    MOONFORGE=(moonforge)
else
    MOONFORGE=(python3 -m moonforge.cli)
fi
LAYOUT=(--tp "$TP" --pp "$PP" --etp "$ETP" --ep "$EP")
if [ -n "${MP_PP0_LAYERS:-}" ]; then
    LAYOUT+=(--pp0-layers "$MP_PP0_LAYERS")
fi

case "$MG2HF" in
    false)
        exec "${MOONFORGE[@]}" convert hf-to-native --hf "$SOURCE_CKPT_PATH" --out "$TARGET_CKPT_PATH" \
            --dtype "$PR" "${LAYOUT[@]}"
        ;;
    true)
        TOKENIZER=()
        if [ -n "$HF_CKPT_PATH" ]; then
            TOKENIZER=(--tokenizer "$HF_CKPT_PATH")
        fi
        exec "${MOONFORGE[@]}" convert native-to-hf --ckpt "$SOURCE_CKPT_PATH" --out "$TARGET_CKPT_PATH" \
            --dtype "$PR" "${LAYOUT[@]}" "${TOKENIZER[@]}"
        ;;
    *)
        echo "error: mg2hf is '$MG2HF'; use false (HF -> moonforge) or true (moonforge -> HF)" >&2
        exit 2
        ;;
esac

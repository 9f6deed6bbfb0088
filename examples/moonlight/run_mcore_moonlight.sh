#!/usr/bin/env bash
# Pai-Megatron-Patch's Moonlight training command line (examples/moonlight/run_mcore_moonlight.sh), training
# with `moonforge train`. Both forms of the seed are accepted, told apart by the number of arguments:
#
#   26 (current script):  ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN PR TP PP CP ETP EP
#                         SP DO SFT AC OPTIMIZER_OFFLOAD SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH
#                         PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS_OR_ITERS WARMUP_TOKENS_OR_ITERS OUTPUT_BASEPATH
#   27 (README and best-practice document): the same with FL (true|false) as the 17th, between DO and SFT
#
#   ENV        dsw: this node, one process per visible GPU | dlc: multi-node, NNODES=$WORLD_SIZE,
#              NODE_RANK=$RANK, GPUS_PER_NODE=${KUBERNETES_CONTAINER_RESOURCE_GPU:-8}, MASTER_ADDR/PORT from the env
#   MODEL_SIZE A3B (Moonlight-16B-A3B)          PR   fp16 | bf16 | fp8 (fp32 also accepted)
#   SFT        false: TRAIN/WARMUP are tokens (iterations = tokens / GBS / SEQ_LEN); true: they are iterations
#   AC         none | sel | full | offload      OPTIMIZER_OFFLOAD  false | a fraction in (0, 1]
#   PRETRAIN_CHECKPOINT_PATH  a Hugging Face directory or a moonforge checkpoint, or none (random initialisation)
#   OUTPUT_BASEPATH  the run goes to OUTPUT_BASEPATH/checkpoint/<run name>, the console log to OUTPUT_BASEPATH/log
# Seed environment: MP_DATASET_TYPE (idxmap | raw), MP_AC_LAYERS, MP_VP, MP_SFT_PACKING, MP_PP0_LAYERS.
# moonforge environment: MOONFORGE_MODEL (a preset such as tiny, or a directory with config.json, instead of
# MODEL_SIZE), MOONFORGE_PRECISION (replaces PR, e.g. fp32 on a CPU), MOONFORGE_NPROC (processes per node),
# MOONFORGE_TOKENIZER (tokenizer directory; needed when PRETRAIN_CHECKPOINT_PATH is none), MOONFORGE_CONFIG
# (base YAML instead of configs/moonlight_16b_a3b_{pretrain,sft}.yaml), MOONFORGE_TRAIN_ARGS (more arguments
# for `moonforge train`, e.g. "--set log_interval=10" or "--dry-run"). docs/training.md maps every argument.
set -euo pipefail

usage() {
    sed -n '2,/^[^#]/{/^#/p}' "$0" >&2
    exit 2
}

die() {
    echo "error: $*" >&2
    exit 2
}

NAMES=(ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN PR TP PP CP ETP EP SP DO SFT AC
       OPTIMIZER_OFFLOAD SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH
       TRAIN_TOKENS_OR_ITERS WARMUP_TOKENS_OR_ITERS OUTPUT_BASEPATH)
case $# in
    26) FL=false ;;
    27) NAMES=("${NAMES[@]:0:16}" FL "${NAMES[@]:16}") ;;
    *) echo "error: expected 26 arguments (current Pai-Megatron-Patch) or 27 (its README form, with FL as the" \
            "17th), got $#" >&2
       usage ;;
esac
declare -A POS
args=("$@")
for i in "${!NAMES[@]}"; do
    printf -v "${NAMES[$i]}" '%s' "${args[$i]}"
    POS[${NAMES[$i]}]=$((i + 1))
done

# Checks name the argument and its position in this form of the command line.
arg() { echo "${1} (argument ${POS[$1]})"; }
positive() { [[ ${!1} =~ ^[1-9][0-9]*$ ]] || die "$(arg "$1") is '${!1}'; it must be a positive integer"; }
non_negative() { [[ ${!1} =~ ^[0-9]+$ ]] || die "$(arg "$1") is '${!1}'; it must be an integer >= 0"; }
boolean() { [[ ${!1} == true || ${!1} == false ]] || die "$(arg "$1") is '${!1}'; use true or false"; }
number() {
    [[ ${!1} =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] || die "$(arg "$1") is '${!1}'; it must be a number"
}

case $ENV in
    dsw|dlc) ;;
    *) die "$(arg ENV) is '$ENV'; use dsw (this node, one process per visible GPU) or dlc (multi-node: WORLD_SIZE" \
           "nodes, this node's RANK, KUBERNETES_CONTAINER_RESOURCE_GPU processes per node)" ;;
esac
[ "$MODEL_SIZE" = A3B ] || die "$(arg MODEL_SIZE) is '$MODEL_SIZE'; only A3B (Moonlight-16B-A3B) is defined (the" \
                               "seed's README calls it A37B by mistake); MOONFORGE_MODEL selects another architecture"
for name in BATCH_SIZE GLOBAL_BATCH_SIZE SEQ_LEN PAD_LEN TP PP CP ETP EP SAVE_INTERVAL TRAIN_TOKENS_OR_ITERS; do
    positive "$name"
done
non_negative WARMUP_TOKENS_OR_ITERS
number LR
number MIN_LR
for name in SP DO FL SFT; do
    boolean "$name"
done

PRECISION=${MOONFORGE_PRECISION:-$PR}
case $PR in
    fp16|bf16|fp8|fp32) ;;
    *) die "$(arg PR) is '$PR'; use fp16, bf16 or fp8 (or fp32)" ;;
esac
case $PRECISION in
    fp16|bf16|fp8|fp32) ;;
    *) die "MOONFORGE_PRECISION is '$PRECISION'; use fp32, bf16, fp16 or fp8" ;;
esac

case $AC in
    none|sel|full|offload) ;;
    *) die "$(arg AC) is '$AC'; use none, sel (selective recomputation), full (recompute whole layers) or offload" \
           "(activations in host memory)" ;;
esac
MP_AC_LAYERS=${MP_AC_LAYERS:-1}
[[ $MP_AC_LAYERS =~ ^[1-9][0-9]*$ ]] || die "MP_AC_LAYERS is '$MP_AC_LAYERS'; it must be a positive integer"

if [ "$OPTIMIZER_OFFLOAD" = false ]; then
    OFFLOAD_FRACTION=0
elif [[ $OPTIMIZER_OFFLOAD =~ ^(0?\.[0-9]*[1-9][0-9]*|1|1\.0*)$ ]]; then
    OFFLOAD_FRACTION=$OPTIMIZER_OFFLOAD
    if [ "$DO" = false ]; then
        echo "note: OPTIMIZER_OFFLOAD needs the distributed optimizer; using DO=true, as the seed does"
        DO=true
    fi
else
    die "$(arg OPTIMIZER_OFFLOAD) is '$OPTIMIZER_OFFLOAD'; use false or a fraction in (0, 1] of the optimizer" \
        "state to keep in host memory"
fi

MP_DATASET_TYPE=${MP_DATASET_TYPE:-idxmap}
case $MP_DATASET_TYPE in
    idxmap|raw) ;;
    *) die "MP_DATASET_TYPE is '$MP_DATASET_TYPE'; use idxmap (Megatron .bin/.idx files, the default) or raw" \
           "(a JSON file of SFT records)" ;;
esac
MP_SFT_PACKING=${MP_SFT_PACKING:-false}
case $MP_SFT_PACKING in
    false) ;;
    true) echo "note: MP_SFT_PACKING: packing is chosen when the SFT idxmap is built (the 6th argument of" \
               "run_build_idxmap_sft_dataset.sh); packed rows train with per-sample attention and positions" ;;
    *) die "MP_SFT_PACKING is '$MP_SFT_PACKING'; use true or false" ;;
esac
if [ -n "${MP_VP:-}" ]; then
    [[ $MP_VP =~ ^[1-9][0-9]*$ ]] || die "MP_VP is '$MP_VP'; it must be a positive number of layers per virtual stage"
    [ "$PP" -gt 1 ] || die "MP_VP (layers per virtual pipeline stage) needs PP > 1; $(arg PP) is $PP"
fi
if [ -n "${MP_PP0_LAYERS:-}" ]; then
    [[ $MP_PP0_LAYERS =~ ^[1-9][0-9]*$ ]] || die "MP_PP0_LAYERS is '$MP_PP0_LAYERS'; it must be a positive integer"
    [ "$PP" -gt 1 ] || die "MP_PP0_LAYERS=$MP_PP0_LAYERS sets an uneven first pipeline stage, which needs PP > 1;" \
                           "$(arg PP) is 1 (the seed stops here too: uneven pipeline split must be used when PP > 1)"
fi

# ------------------------------------------------------------------ model and starting point
config_json() {  # config.json of a Hugging Face directory, a moonforge checkpoint or one of its iter_* directories
    local dir=$1
    for f in "$dir/config.json" "$dir/../config.json"; do
        if [ -f "$f" ]; then
            echo "$f"
            return
        fi
    done
}
json_field() {
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get(sys.argv[2], ""))' "$1" "$2"
}

INIT_FROM=
ARCH_JSON=
if [ "$PRETRAIN_CHECKPOINT_PATH" != none ]; then
    [ -d "$PRETRAIN_CHECKPOINT_PATH" ] || die "$(arg PRETRAIN_CHECKPOINT_PATH) '$PRETRAIN_CHECKPOINT_PATH' is not a" \
        "directory; give a Hugging Face model directory, a moonforge checkpoint, or none"
    ARCH_JSON=$(config_json "$PRETRAIN_CHECKPOINT_PATH")
    [ -n "$ARCH_JSON" ] || die "$(arg PRETRAIN_CHECKPOINT_PATH) '$PRETRAIN_CHECKPOINT_PATH' has no config.json;" \
        "give a Hugging Face model directory or a moonforge checkpoint (convert Megatron checkpoints to Hugging" \
        "Face first)"
    INIT_FROM=$PRETRAIN_CHECKPOINT_PATH
elif [ -z "${MOONFORGE_TOKENIZER:-}" ]; then
    die "$(arg PRETRAIN_CHECKPOINT_PATH) is none, so there is no checkpoint to take the tokenizer from; set" \
        "MOONFORGE_TOKENIZER to the tokenizer directory"
fi
if [ -n "${MOONFORGE_MODEL:-}" ]; then
    MODEL=$MOONFORGE_MODEL
    MODEL_LABEL=$(basename "$MODEL")
    if [ -z "$ARCH_JSON" ] && [ -d "$MODEL" ]; then
        ARCH_JSON=$(config_json "$MODEL")
    fi
else
    MODEL=moonlight-16b-a3b
    MODEL_LABEL=moonlight-$MODEL_SIZE
    if [ -n "$ARCH_JSON" ]; then
        shape="$(json_field "$ARCH_JSON" num_hidden_layers)/$(json_field "$ARCH_JSON" hidden_size)"
        shape="$shape/$(json_field "$ARCH_JSON" n_routed_experts)"
        [ "$shape" = 27/2048/64 ] || die "$(arg PRETRAIN_CHECKPOINT_PATH) holds a model with layers/hidden/experts" \
            "$shape ($ARCH_JSON), not Moonlight-16B-A3B's 27/2048/64; set MOONFORGE_MODEL to train another" \
            "architecture (the checkpoint's config.json then decides it)"
    fi
fi

# The seed's layer-count checks, where the number of layers is known here (the trainer checks the rest).
NUM_LAYERS=
if [ -n "$ARCH_JSON" ]; then
    NUM_LAYERS=$(json_field "$ARCH_JSON" num_hidden_layers)
elif [ -z "${MOONFORGE_MODEL:-}" ]; then
    NUM_LAYERS=27
fi
if [ -n "$NUM_LAYERS" ]; then
    if [ "$AC" = full ] && [ $(( (NUM_LAYERS / PP) % MP_AC_LAYERS )) -ne 0 ]; then
        die "AC=full recomputes the layers of each pipeline stage in groups of MP_AC_LAYERS=$MP_AC_LAYERS, which" \
            "must divide the $((NUM_LAYERS / PP)) layers per stage ($NUM_LAYERS layers, PP=$PP), as in the seed"
    fi
    if [ -n "${MP_PP0_LAYERS:-}" ]; then
        rest=$((NUM_LAYERS - MP_PP0_LAYERS))
        if [ "$rest" -lt "$((PP - 1))" ] || [ $((rest % (PP - 1))) -ne 0 ]; then
            die "MP_PP0_LAYERS=$MP_PP0_LAYERS leaves $rest of the $NUM_LAYERS layers for the other $((PP - 1))" \
                "pipeline stages; they must split evenly (with PP=$PP, e.g. MP_PP0_LAYERS=" \
                "$(( NUM_LAYERS - (NUM_LAYERS / PP) * (PP - 1) )))"
        fi
    fi
fi

# ------------------------------------------------------------------ data
json_list() {  # a YAML/JSON flow list of strings
    local out= item
    for item in "$@"; do
        item=${item//\\/\\\\}
        out+="${out:+, }\"${item//\"/\\\"}\""
    done
    echo "[$out]"
}

read -r -a DATA_WORDS <<< "$DATASET_PATH"
[ ${#DATA_WORDS[@]} -gt 0 ] || die "$(arg DATASET_PATH) is empty"
if [ "$MP_DATASET_TYPE" = raw ]; then
    [ "$SFT" = true ] || die "MP_DATASET_TYPE=raw reads SFT records from JSON and needs $(arg SFT)=true, as in the seed"
    [ -f "$DATASET_PATH" ] || die "$(arg DATASET_PATH) '$DATASET_PATH' is not a file (MP_DATASET_TYPE=raw reads one" \
                                  "JSON or JSONL file of SFT records)"
    [ -f "$VALID_DATASET_PATH" ] || die "$(arg VALID_DATASET_PATH) '$VALID_DATASET_PATH' is not a file" \
                                        "(MP_DATASET_TYPE=raw validates on it)"
    TRAIN_DATA=$(json_list "$DATASET_PATH")
    VALID_DATA=$(json_list "$VALID_DATASET_PATH")
    PAD=$PAD_LEN
else
    # One prefix, or Megatron's blend "W1 PREFIX1 W2 PREFIX2 ..."; the 1% validation split comes from it.
    for word in "${DATA_WORDS[@]}"; do
        [[ $word =~ ^[0-9]*\.?[0-9]+$ ]] && [ ${#DATA_WORDS[@]} -gt 1 ] && continue
        [ -f "$word.idx" ] && [ -f "$word.bin" ] || die "$(arg DATASET_PATH): '$word' is not a Megatron dataset" \
            "prefix ($word.bin / $word.idx not found)"
        if [ "$SFT" = true ] && [ ! -f "$word.sft.json" ]; then
            die "$(arg DATASET_PATH) '$word' is a pretraining idxmap but SFT=true; build an SFT idxmap" \
                "(assistant-only loss) with run_build_idxmap_sft_dataset.sh (the seed's README passes the" \
                "pretraining prefix here)"
        fi
        if [ "$SFT" = false ] && [ -f "$word.sft.json" ]; then
            die "$(arg DATASET_PATH) '$word' is an SFT idxmap but SFT=false; use a pretraining idxmap or SFT=true"
        fi
    done
    TRAIN_DATA=$(json_list "${DATA_WORDS[@]}")
    VALID_DATA="[]"
    PAD=null
fi

# ------------------------------------------------------------------ iterations and run name
if [ "$SFT" = true ]; then
    TRAIN_ITERS=$TRAIN_TOKENS_OR_ITERS
    WARMUP_ITERS=$WARMUP_TOKENS_OR_ITERS
    COUNTS=("train_iters=$TRAIN_ITERS" "warmup_iters=$WARMUP_ITERS" "train_tokens=null" "warmup_tokens=null")
    MODE=finetune
else
    TRAIN_ITERS=$(( TRAIN_TOKENS_OR_ITERS / GLOBAL_BATCH_SIZE / SEQ_LEN ))
    WARMUP_ITERS=$(( WARMUP_TOKENS_OR_ITERS / GLOBAL_BATCH_SIZE / SEQ_LEN ))
    [ "$TRAIN_ITERS" -ge 1 ] || die "$(arg TRAIN_TOKENS_OR_ITERS)=$TRAIN_TOKENS_OR_ITERS tokens is less than one" \
                                    "iteration of GLOBAL_BATCH_SIZE x SEQ_LEN = $((GLOBAL_BATCH_SIZE * SEQ_LEN)) tokens"
    COUNTS=("train_tokens=$TRAIN_TOKENS_OR_ITERS" "warmup_tokens=$WARMUP_TOKENS_OR_ITERS" "train_iters=null"
            "warmup_iters=null")
    MODE=pretrain
fi
NAME="$MODE-$MODEL_LABEL-lr-$LR-minlr-$MIN_LR-bs-$BATCH_SIZE-gbs-$GLOBAL_BATCH_SIZE-seqlen-$SEQ_LEN-pr-$PRECISION"
NAME="$NAME-tp-$TP-pp-$PP-cp-$CP-ac-$AC-do-$DO-sp-$SP-ti-$TRAIN_ITERS-wi-$WARMUP_ITERS"
OUTPUT_DIR="$OUTPUT_BASEPATH/checkpoint/$NAME"

# ------------------------------------------------------------------ moonforge train
HERE=$(cd "$(dirname "$0")" && pwd)
if [ "$SFT" = true ]; then
    CONFIG=${MOONFORGE_CONFIG:-$HERE/../../configs/moonlight_16b_a3b_sft.yaml}
else
    CONFIG=${MOONFORGE_CONFIG:-$HERE/../../configs/moonlight_16b_a3b_pretrain.yaml}
fi
[ -f "$CONFIG" ] || die "base config '$CONFIG' not found; set MOONFORGE_CONFIG to a training YAML"

case $AC in
    full|sel) AC_LAYERS=null ;;     # every layer; MP_AC_LAYERS only groups them in Megatron's uniform method
    offload) AC_LAYERS=$MP_AC_LAYERS ;;
    none) AC_LAYERS=null ;;
esac
SP_ON=false
if [ "$SP" = true ] && [ "$TP" -gt 1 ]; then
    SP_ON=true
fi
if [ "$DO" = true ]; then DATA_PARALLEL=fsdp; else DATA_PARALLEL=replicate; fi
if [ "$FL" = true ]; then ATTENTION=varlen; else ATTENTION=sdpa; fi

SETS=(
    "micro_batch_size=$BATCH_SIZE" "global_batch_size=$GLOBAL_BATCH_SIZE" "lr=$LR" "min_lr=$MIN_LR"
    "seq_len=$SEQ_LEN" "pad_len=$PAD" "precision=$PRECISION"
    "parallel.tp=$TP" "parallel.pp=$PP" "parallel.cp=$CP" "parallel.etp=$ETP" "parallel.ep=$EP"
    "parallel.sp=$SP_ON" "parallel.data_parallel=$DATA_PARALLEL"
    "parallel.pp0_layers=${MP_PP0_LAYERS:-null}" "parallel.vp_layers=${MP_VP:-null}"
    "attention_backend=$ATTENTION" "sft=$SFT" "activation_checkpointing=$AC" "ac_layers=$AC_LAYERS"
    "optimizer_offload=$OFFLOAD_FRACTION" "save_interval=$SAVE_INTERVAL"
    "data.type=$MP_DATASET_TYPE" "data.train=$TRAIN_DATA" "data.valid=$VALID_DATA"
    "init_from=${INIT_FROM:-null}" "model=$MODEL" "${COUNTS[@]}" "output_dir=$OUTPUT_DIR"
)
if [ -n "${MOONFORGE_TOKENIZER:-}" ]; then
    SETS+=("data.tokenizer=$MOONFORGE_TOKENIZER")
fi
# The presets compile whole blocks; that needs bf16 compute and does not combine with selective recomputation.
if { [ "$PRECISION" != bf16 ] && [ "$PRECISION" != fp8 ]; } || [ "$AC" = sel ]; then
    SETS+=("compile_blocks=false")
fi

if [ "$ENV" = dsw ]; then
    NNODES=1
    NODE_RANK=0
    NPROC=${MOONFORGE_NPROC:-}        # empty: `moonforge train` uses every visible GPU (1 process on a CPU)
    LOG_SUFFIX=
else
    [[ ${WORLD_SIZE:-} =~ ^[1-9][0-9]*$ ]] || die "ENV=dlc: WORLD_SIZE (the number of nodes) is '${WORLD_SIZE:-}';" \
        "the platform sets it to a positive integer"
    [[ ${RANK:-} =~ ^[0-9]+$ ]] && [ "$RANK" -lt "$WORLD_SIZE" ] || die "ENV=dlc: RANK (this node's rank) is" \
        "'${RANK:-}'; it must be in [0, WORLD_SIZE=$WORLD_SIZE)"
    if [ "$WORLD_SIZE" -gt 1 ]; then
        [ -n "${MASTER_ADDR:-}" ] || die "ENV=dlc: MASTER_ADDR (the address of node 0) is not set"
        [ -n "${MASTER_PORT:-}" ] || die "ENV=dlc: MASTER_PORT (a free port on node 0) is not set"
    fi
    NNODES=$WORLD_SIZE
    NODE_RANK=$RANK
    NPROC=${MOONFORGE_NPROC:-${KUBERNETES_CONTAINER_RESOURCE_GPU:-8}}
    LOG_SUFFIX=-node$NODE_RANK
fi
LAUNCH=()
if [ -n "$NPROC" ]; then
    [[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "processes per node is '$NPROC'; it must be a positive integer"
    LAUNCH=(--nproc "$NPROC")
fi

read -r -a EXTRA <<< "${MOONFORGE_TRAIN_ARGS:-}"
# MOONFORGE (environment): the command to run instead of `moonforge`, as in the data scripts.
if [ -n "${MOONFORGE:-}" ]; then
    read -r -a RUN <<< "$MOONFORGE"
elif command -v moonforge >/dev/null 2>&1; then
    RUN=(moonforge)
else
    RUN=(python3 -m moonforge.cli)
fi
RUN+=(train "$CONFIG")
for item in "${SETS[@]}"; do
    RUN+=(--set "$item")
done
RUN+=(${LAUNCH[@]+"${LAUNCH[@]}"} ${EXTRA[@]+"${EXTRA[@]}"})

mkdir -p "$OUTPUT_BASEPATH/checkpoint" "$OUTPUT_BASEPATH/log"
LOG="$OUTPUT_BASEPATH/log/${NAME}_$(date "+%Y.%m.%d-%H.%M.%S")$LOG_SUFFIX.log"
{
    echo "run $NAME on $NNODES node(s) (this is node $NODE_RANK): output in $OUTPUT_DIR, log in $LOG"
    printf '%q ' "${RUN[@]}"
    echo
} | tee -a "$LOG"
# WORLD_SIZE and RANK count nodes on the platform; the launcher sets them per process.
env -u WORLD_SIZE -u RANK -u LOCAL_RANK NNODES="$NNODES" NODE_RANK="$NODE_RANK" "${RUN[@]}" 2>&1 | tee -a "$LOG"

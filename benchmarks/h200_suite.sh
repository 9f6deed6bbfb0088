#!/usr/bin/env bash
# The GPU benchmark suite behind benchmarks/results/*_h200*.json. Usage:
#   bash benchmarks/h200_suite.sh one OUTDIR    # one H200: 6-layer Moonlight vs transformers, parity
#   bash benchmarks/h200_suite.sh two OUTDIR    # two H200s: full 27-layer Moonlight pretraining and packed SFT
#   bash benchmarks/h200_suite.sh two-c OUTDIR  # two H200s: all-gather dispatcher, deferred gradient sync
#   bash benchmarks/h200_suite.sh two-d OUTDIR  # two H200s: all-to-all, deferred gradient sync, partial recomputation
#   bash benchmarks/h200_suite.sh two-e OUTDIR  # two H200s: both dispatchers on one lease, with a machine probe
#   bash benchmarks/h200_suite.sh two-f OUTDIR  # two H200s: packed SFT at 8k, expert weights cast per use, less recomputation
#   bash benchmarks/h200_suite.sh two-g OUTDIR  # two H200s: 27 layers at MBS 1, MBS 2 (per-use casts), NUMA-bound
#   bash benchmarks/h200_suite.sh offload OUTDIR  # one H200: full-model SFT, optimizer state in host memory
#   bash benchmarks/h200_suite.sh offload-b OUTDIR  # one H200: full-model SFT with less recomputation
#   bash benchmarks/h200_suite.sh muon OUTDIR   # one H200 holding one EP 8 rank's share: Muon vs AdamW steps
#   bash benchmarks/h200_suite.sh muon-two OUTDIR  # two H200s, EP 2 + FSDP 2: Muon spread vs replicated (NCCL)
#   bash benchmarks/h200_suite.sh host OUTDIR   # one H200: 27 layers x 8 experts, idle time and host synchronisations
#   bash benchmarks/h200_suite.sh blocks OUTDIR # one H200: the same, whole-block torch.compile against compiled kernels
#   bash benchmarks/h200_suite.sh blocks-b OUTDIR # one H200: those pairs in the other order; 6 layers vs transformers, blocks compiled
#   bash benchmarks/h200_suite.sh two-h OUTDIR  # two H200s: 27-layer pretraining and packed SFT with and without whole-block compile
#   bash benchmarks/h200_suite.sh blocks-c OUTDIR # one H200: GPU time by kernel kind with blocks compiled; full-model SFT with them
#   bash benchmarks/h200_suite.sh blocks-d OUTDIR # one H200: kernels then blocks, idle time counted from kernels only
#   bash benchmarks/h200_suite.sh defer OUTDIR  # one H200: gradients reduced once per step (as two GPUs do) or per micro-batch
#   bash benchmarks/h200_suite.sh fp8 OUTDIR    # one H200: precision fp8 against bf16, 27 layers x 8 experts, seq 4096 and packed SFT
#   bash benchmarks/h200_suite.sh fp8-6l OUTDIR # one H200: precision fp8 against bf16, 6 layers, the one-GPU engine (flat buffers)
#   bash benchmarks/h200_suite.sh two-i OUTDIR  # two H200s: the two-GPU targets with blocks compiled, fp8 against bf16
#   bash benchmarks/h200_suite.sh two-j OUTDIR  # two H200s, blocks compiled, bf16: the static all-gather dispatcher (no host
#       synchronisation) against the all-to-all, alternating, for 27-layer pretraining; then packed SFT at 8k
#   bash benchmarks/h200_suite.sh check OUTDIR  # one GPU: logits parity, 6 layers vs transformers (blocks compiled),
#       and the tests with GPU cases
#   bash benchmarks/h200_suite.sh optim OUTDIR [BASE]  # one GPU: AdamW compiled over chunks of parameters and one
#       sync per step, between two runs of the tree in BASE (an earlier commit: `git archive 6a0406d | tar x -C BASE`);
#       OPTIM_LAYERS (default 27), OPTIM_FLAGS (default --host-profile --sync-audit), BASE_COMMIT (the base's name),
#       OPTIM_BASE_AGAIN=0 (skip the third run)
#   bash benchmarks/h200_suite.sh fp8-cache OUTDIR  # one GPU: FP8 with weights quantised once per step, against bf16
#       and per-use FP8; FP8_LAYERS (default 20) layers x 8 experts, then (FP8_6L=0 skips) 6 layers, all 64 experts
# Each run writes one JSON (see benchmarks/train_bench.py); a failing run records its error and the suite goes on.
set -u
MODE=$1; OUT=$2; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONPATH=${PYTHONPATH:-$PWD}
bench() {  # bench NAME NPROC TIMEOUT ARGS...
  local name=$1 nproc=$2 limit=$3; shift 3
  timeout "$limit" torchrun --standalone --nproc_per_node "$nproc" ${TORCHRUN_ARGS:-} benchmarks/train_bench.py --label "$name" \
    --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? $(grep -E '"(tokens_per_s_per_gpu|tflops_per_gpu|peak_memory_gib|speedup|error)"' \
    "$OUT/$name.log" | tr -d ' \n')"
}
if [ "$MODE" = one ]; then
  python3 benchmarks/gpu_parity.py --out "$OUT/gpu_parity_h200.json" > "$OUT/parity.log" 2>&1; tail -6 "$OUT/parity.log"
  bench train_6l_h200_compiled_vs_hf 1 300 --layers 6 --mbs 2 --seq 4096 --steps 8 --warmup 4 --state-dtype bf16 \
    --compile --hf-baseline
fi
if [ "$MODE" = two ]; then
  COMMON="--steps 5 --warmup 3 --state-dtype bf16 --compile"
  bench train_6l_2xh200_fsdp2 2 100 --layers 6 --mbs 1 --gbs 4 --seq 4096 $COMMON
  bench train_27l_2xh200_ep2 2 200 --layers 27 --mbs 1 --gbs 8 --ep 2 --seq 4096 --ac sel $COMMON
  bench sft_packed_8k_27l_2xh200_ep2 2 170 --layers 27 --mbs 1 --gbs 4 --ep 2 --seq 8192 --ac full \
    --attention varlen --packed 8 $COMMON
fi
if [ "$MODE" = two-b ]; then  # keep gathered weights between forward and backward; without recomputation
  COMMON="--steps 5 --warmup 3 --state-dtype bf16 --compile --set parallel.reshard_after_forward=false"
  bench train_27l_2xh200_ep2_noreshard 2 170 --layers 27 --mbs 1 --gbs 8 --ep 2 --seq 4096 --ac none $COMMON
  bench train_27l_2xh200_ep2_noreshard_sel 2 170 --layers 27 --mbs 1 --gbs 8 --ep 2 --seq 4096 --ac sel $COMMON
fi
if [ "$MODE" = two-c ]; then  # all-gather dispatcher, one gradient reduction per step, partial recomputation
  COMMON="--steps 5 --warmup 3 --state-dtype bf16 --compile --set parallel.reshard_after_forward=false \
    --set parallel.ep_dispatcher=allgather"
  bench train_27l_2xh200_ep2_allgather 2 150 --layers 27 --mbs 1 --gbs 8 --ep 2 --seq 4096 --ac none $COMMON
  bench sft_packed_8k_27l_2xh200_ep2_allgather_ac17_defer 2 150 --layers 27 --mbs 1 --gbs 8 --ep 2 --seq 8192 \
    --ac full --ac-layers 17 --attention varlen --packed 8 $COMMON --set parallel.defer_grad_sync=true
  bench train_27l_2xh200_ep2_allgather_defer 2 150 --layers 27 --mbs 1 --gbs 8 --ep 2 --seq 4096 --ac none \
    $COMMON --set parallel.defer_grad_sync=true
  bench sft_packed_8k_27l_2xh200_ep2_allgather 2 140 --layers 27 --mbs 1 --gbs 4 --ep 2 --seq 8192 --ac full \
    --attention varlen --packed 8 $COMMON
fi
if [ "$MODE" = two-d ]; then  # the all-to-all dispatcher with expert casts once per step, deferred gradient sync
  COMMON="--steps 5 --warmup 3 --state-dtype bf16 --compile --set parallel.reshard_after_forward=false"
  bench train_27l_2xh200_ep2_cast_once 2 150 --layers 27 --mbs 1 --gbs 8 --ep 2 --seq 4096 --ac none $COMMON
  bench train_27l_2xh200_ep2_defer 2 150 --layers 27 --mbs 1 --gbs 8 --ep 2 --seq 4096 --ac none $COMMON \
    --set parallel.defer_grad_sync=true
  bench sft_packed_8k_27l_2xh200_ep2_ac17_defer 2 150 --layers 27 --mbs 1 --gbs 8 --ep 2 --seq 8192 --ac full \
    --ac-layers 17 --attention varlen --packed 8 $COMMON --set parallel.defer_grad_sync=true
  bench sft_packed_8k_27l_2xh200_ep2_ac15_defer 2 150 --layers 27 --mbs 1 --gbs 8 --ep 2 --seq 8192 --ac full \
    --ac-layers 15 --attention varlen --packed 8 $COMMON --set parallel.defer_grad_sync=true
fi
if [ "$MODE" = two-e ]; then  # both dispatchers on one lease, with its matmul/copy/NCCL probe
  COMMON="--steps 5 --warmup 3 --state-dtype bf16 --compile --set parallel.reshard_after_forward=false \
    --set parallel.defer_grad_sync=true"
  for d in alltoall allgather; do
    bench train_27l_2xh200_ep2_defer_$d 2 110 --layers 27 --mbs 1 --gbs 8 --ep 2 --seq 4096 --ac none $COMMON \
      --set parallel.ep_dispatcher=$d
    bench sft_packed_8k_27l_2xh200_ep2_ac17_defer_$d 2 110 --layers 27 --mbs 1 --gbs 8 --ep 2 --seq 8192 \
      --ac full --ac-layers 17 --attention varlen --packed 8 $COMMON --set parallel.ep_dispatcher=$d
  done
fi
if [ "$MODE" = two-f ]; then  # memory from per-use expert casts spent on recomputing fewer layers
  COMMON="--steps 5 --warmup 3 --state-dtype bf16 --compile --set parallel.reshard_after_forward=false \
    --set parallel.ep_dispatcher=allgather"
  SFT="--layers 27 --mbs 1 --gbs 8 --ep 2 --seq 8192 --attention varlen --packed 8"
  bench sft_packed_8k_27l_2xh200_ep2_allgather_ac17 2 130 $SFT --ac full --ac-layers 17 $COMMON
  for n in ${AC_LAYERS:-8 4}; do
    bench sft_packed_8k_27l_2xh200_ep2_allgather_ac${n}_castuse 2 130 $SFT --ac full --ac-layers $n $COMMON \
      --set parallel.cache_expert_casts=false
  done
fi
if [ "$MODE" = two-g ]; then  # is the host the limit? half the micro-batches (MBS 2), or processes bound to NUMA nodes
  COMMON="--steps 4 --warmup 2 --state-dtype bf16 --compile --no-profile --set parallel.reshard_after_forward=false"
  PRE="--layers 27 --gbs 8 --ep 2 --seq 4096 --ac none"
  bench train_27l_2xh200_ep2_mbs1 2 80 $PRE --mbs 1 $COMMON
  bench train_27l_2xh200_ep2_mbs2_castuse 2 80 $PRE --mbs 2 $COMMON --set parallel.cache_expert_casts=false
  TORCHRUN_ARGS="--numa-binding node" bench train_27l_2xh200_ep2_mbs1_numa 2 80 $PRE --mbs 1 $COMMON
fi
if [ "$MODE" = offload ]; then  # all 27 layers on ONE H200: bf16 weights + fp32 gradients on the GPU
  python3 -c "import tests.test_flat_adamw as t; t.test_streamed_offload_on_a_gpu_matches_the_plain_optimizer(); \
print('streamed offload on the GPU matches the plain optimizer')" 2>&1 | tail -2
  bench sft_27l_1xh200_offload 1 400 --layers 27 --mbs 1 --gbs 8 --seq 4096 --ac full --state-dtype bf16 \
    --offload 1.0 --compile --attention varlen --packed 8 --steps 3 --warmup 2
  bench sft_27l_1xh200_offload_gbs32 1 400 --layers 27 --mbs 1 --gbs 32 --seq 4096 --ac full --state-dtype bf16 \
    --offload 1.0 --compile --attention varlen --packed 8 --steps 3 --warmup 1 --no-profile
fi
if [ "$MODE" = offload-b ]; then  # the same with less or no recomputation: the GPU has room for activations
  for ac in none 6; do
    bench sft_27l_1xh200_offload_gbs32_ac$ac 1 130 --layers 27 --mbs 1 --gbs 32 --seq 4096 --state-dtype bf16 \
      --offload 1.0 --compile --attention varlen --packed 8 --steps 2 --warmup 1 --no-profile \
      $([ $ac = none ] && echo "--ac none" || echo "--ac full --ac-layers $ac")
  done
fi
if [ "$MODE" = muon ]; then  # 8 experts per layer: one EP 8 rank's parameters, Moonlight's FLOPs per token
  for opt in adamw muon; do
    bench muon_vs_adamw_27l_ep8share_h200_$opt 1 280 --layers 27 --experts 8 --engine fsdp --optimizer $opt \
      --mbs 1 --gbs 32 --seq 4096 --ac sel --compile --steps 3 --warmup 1 --no-profile
  done
fi
if [ "$MODE" = muon-two ]; then  # same data and seed: spread and replicated Muon must give the same losses
  COMMON="--layers 6 --mbs 1 --gbs 8 --ep 2 --seq 4096 --compile --steps 4 --warmup 1 --no-profile"
  bench muon_6l_2xh200_ep2_adamw 2 200 $COMMON --optimizer adamw
  for mode in spread replicated; do
    bench muon_6l_2xh200_ep2_$mode 2 200 $COMMON --optimizer muon --set muon.distributed_mode=$mode
  done
fi
if [ "$MODE" = host ]; then  # one H200, no NCCL: is a 27-layer step host-bound? where does the host wait for the GPU?
  COMMON="--layers 27 --experts 8 --engine fsdp --mbs 1 --gbs 4 --state-dtype bf16 --compile --steps 3 --warmup 2 \
    --sync-audit"
  bench host_27l_e8_4k_h200 1 200 $COMMON --seq 4096 --ac none
  bench host_27l_e8_sft8k_h200 1 200 $COMMON --seq 8192 --ac full --ac-layers 17 --attention varlen --packed 8
fi
if [ "$MODE" = blocks ]; then  # one H200: whole-block torch.compile against compiled element-wise kernels only
  COMMON="--layers 27 --experts 8 --engine fsdp --mbs 1 --gbs 4 --state-dtype bf16 --compile --steps 3 --warmup 2"
  bench host_27l_e8_4k_h200_blocks 1 250 $COMMON --seq 4096 --ac none --compile-blocks --host-profile
  bench host_27l_e8_4k_h200_kernels 1 200 $COMMON --seq 4096 --ac none --host-profile
  bench host_27l_e8_sft8k_h200_blocks 1 250 $COMMON --seq 8192 --ac full --ac-layers 17 --attention varlen \
    --packed 8 --compile-blocks
  bench host_27l_e8_sft8k_h200_kernels 1 200 $COMMON --seq 8192 --ac full --ac-layers 17 --attention varlen --packed 8
fi
if [ "$MODE" = blocks-b ]; then  # the same pairs in the other order (compiled kernels first), and 6 layers vs transformers
  COMMON="--layers 27 --experts 8 --engine fsdp --mbs 1 --gbs 4 --state-dtype bf16 --compile --steps 3 --warmup 2"
  SFT="--seq 8192 --ac full --ac-layers 17 --attention varlen --packed 8"
  bench host_27l_e8_sft8k_h200_kernels_b 1 200 $COMMON $SFT
  bench host_27l_e8_sft8k_h200_blocks_b 1 250 $COMMON $SFT --compile-blocks
  bench host_27l_e8_4k_h200_kernels_b 1 200 $COMMON --seq 4096 --ac none
  bench host_27l_e8_4k_h200_blocks_b 1 250 $COMMON --seq 4096 --ac none --compile-blocks
  bench train_6l_h200_blocks_vs_hf 1 300 --layers 6 --mbs 2 --seq 4096 --steps 8 --warmup 4 --state-dtype bf16 \
    --compile --compile-blocks --hf-baseline
fi
if [ "$MODE" = two-h ]; then  # two H200s: the two-GPU targets with and without whole-block compile, in both orders
  COMMON="--steps 4 --warmup 2 --state-dtype bf16 --compile --set parallel.reshard_after_forward=false \
    --set parallel.ep_dispatcher=allgather"
  SFT="--layers 27 --mbs 1 --gbs 8 --ep 2 --seq 8192 --attention varlen --packed 8 --ac full --ac-layers 17"
  PRE="--layers 27 --mbs 1 --gbs 8 --ep 2 --seq 4096 --ac none"
  bench sft_packed_8k_27l_2xh200_ep2_allgather_ac17_kernels 2 140 $SFT $COMMON
  bench sft_packed_8k_27l_2xh200_ep2_allgather_ac17_blocks 2 150 $SFT $COMMON --compile-blocks
  bench train_27l_2xh200_ep2_allgather_blocks 2 150 $PRE $COMMON --compile-blocks
  bench train_27l_2xh200_ep2_allgather_kernels 2 140 $PRE $COMMON
fi
if [ "$MODE" = blocks-c ]; then  # one H200: where the GPU time goes with blocks compiled; the one-GPU full-model SFT with them
  bench host_27l_e8_4k_h200_blocks_kernels 1 200 --layers 27 --experts 8 --engine fsdp --mbs 1 --gbs 4 \
    --state-dtype bf16 --compile --steps 3 --warmup 2 --seq 4096 --ac none --compile-blocks
  bench sft_27l_1xh200_offload_gbs32_acnone_blocks 1 220 --layers 27 --mbs 1 --gbs 32 --seq 4096 --state-dtype bf16 \
    --offload 1.0 --compile --compile-blocks --attention varlen --packed 8 --steps 2 --warmup 1 --no-profile --ac none
fi
if [ "$MODE" = blocks-d ]; then  # one H200: idle time without the GPU-side annotation ranges, kernels then blocks
  COMMON="--layers 27 --experts 8 --engine fsdp --mbs 1 --gbs 4 --state-dtype bf16 --compile --steps 3 --warmup 2"
  bench host_27l_e8_4k_h200_kernels_d 1 200 $COMMON --seq 4096 --ac none
  bench host_27l_e8_4k_h200_blocks_d 1 200 $COMMON --seq 4096 --ac none --compile-blocks
fi
if [ "$MODE" = defer ]; then  # one H200, blocks compiled: FSDP reduces once per step (the multi-GPU default) or per micro-batch
  COMMON="--layers 27 --experts 8 --engine fsdp --mbs 1 --gbs 4 --state-dtype bf16 --compile --compile-blocks --steps 3 \
    --warmup 2 --seq 4096 --ac none --host-profile"
  bench host_27l_e8_4k_h200_blocks_defer 1 200 $COMMON --set parallel.defer_grad_sync=true --sync-audit
  bench host_27l_e8_4k_h200_blocks_nodefer 1 200 $COMMON --set parallel.defer_grad_sync=false
fi
if [ "$MODE" = fp8 ]; then  # one H200, blocks compiled: FP8 products (rowwise, weight gradient in bf16) against bf16
  COMMON="--layers 27 --experts 8 --engine fsdp --mbs 1 --gbs 4 --state-dtype bf16 --compile --compile-blocks --steps 3 \
    --warmup 2"
  SFT="--seq 8192 --ac full --ac-layers 17 --attention varlen --packed 8"
  bench host_27l_e8_4k_h200_fp8 1 150 $COMMON --seq 4096 --ac none --precision fp8
  bench host_27l_e8_4k_h200_bf16 1 150 $COMMON --seq 4096 --ac none
  bench host_27l_e8_sft8k_h200_fp8 1 150 $COMMON $SFT --precision fp8
  [ -n "${FP8_SHORT:-}" ] || bench host_27l_e8_sft8k_h200_bf16 1 150 $COMMON $SFT
fi
if [ "$MODE" = fp8-6l ]; then  # the default one-GPU engine (flat buffers), 6 layers with all 64 experts, MBS 2 x 4096
  COMMON="--layers 6 --mbs 2 --seq 4096 --steps 4 --warmup 2 --state-dtype bf16 --compile --compile-blocks --no-profile"
  bench train_6l_h200_fp8 1 140 $COMMON --precision fp8
  bench train_6l_h200_bf16 1 140 $COMMON
fi
if [ "$MODE" = check ]; then  # a regression check of the one-GPU target at the current commit, on whatever GPU
  G=${GPU_TAG:-h200}
  python3 benchmarks/gpu_parity.py --out "$OUT/gpu_parity_$G.json" > "$OUT/parity.log" 2>&1; tail -6 "$OUT/parity.log"
  bench train_6l_${G}_blocks_vs_hf_check 1 300 --layers 6 --mbs 2 --seq 4096 --steps 8 --warmup 4 --state-dtype bf16 \
    --compile --compile-blocks --hf-baseline
  # The tests with GPU cases (compiled AdamW, FP8 products, expert casts, FSDP's routed accumulation).
  timeout 300 python3 -m pytest -q tests/test_adamw.py tests/test_fp8.py tests/test_expert_cast.py tests/test_comm.py \
    tests/test_fsdp_accumulation.py > "$OUT/pytest_gpu.log" 2>&1; echo "GPU tests: $(tail -1 "$OUT/pytest_gpu.log")"
fi
if [ "$MODE" = optim ]; then  # one GPU, blocks compiled, L layers x 8 experts: the tree in $3, this tree, $3 again
  L=${OPTIM_LAYERS:-27}  # 20 keeps an H100 (80 GB) clear of allocator retries, which would swamp the host times
  COMMON="--layers $L --experts 8 --engine fsdp --mbs 1 --gbs 4 --state-dtype bf16 --compile --compile-blocks --steps 4 \
    --warmup 2 --seq 4096 --ac none ${OPTIM_FLAGS:---host-profile --sync-audit}"
  base() { (cd "$1" && export PYTHONPATH=$PWD MOONFORGE_COMMIT=${BASE_COMMIT:-base} && bench "$2" 1 240 $COMMON); }
  [ -z "${3:-}" ] || base "$3" host_${L}l_e8_4k_optim_base
  bench host_${L}l_e8_4k_optim 1 240 $COMMON
  [ -z "${3:-}" ] || [ "${OPTIM_BASE_AGAIN:-1}" = 0 ] || base "$3" host_${L}l_e8_4k_optim_base_again
fi
if [ "$MODE" = fp8-cache ]; then  # one GPU (tag GPU_TAG): weights quantised once per step against bf16, per-use FP8
  G=${GPU_TAG:-h200}; L=${FP8_LAYERS:-20}
  COMMON="--layers $L --experts 8 --engine fsdp --mbs 1 --gbs 4 --state-dtype bf16 --compile --compile-blocks --steps 4 \
    --warmup 2 --seq 4096 --ac none"
  bench host_${L}l_e8_4k_${G}_fp8_cached 1 150 $COMMON --precision fp8 --set fp8_cache_weights=true
  bench host_${L}l_e8_4k_${G}_fp8_per_use 1 150 $COMMON --precision fp8 --set fp8_cache_weights=false --no-profile
  bench host_${L}l_e8_4k_${G}_bf16 1 150 $COMMON --no-profile
  if [ "${FP8_6L:-1}" = 1 ]; then  # one micro-batch per step: nothing to reuse, the copies are not cached
    S6="--layers 6 --mbs 2 --seq 4096 --steps 4 --warmup 2 --state-dtype bf16 --compile --compile-blocks --no-profile"
    bench train_6l_${G}_fp8 1 120 $S6 --precision fp8
    bench train_6l_${G}_bf16 1 120 $S6
  fi
fi

if [ "$MODE" = two-j ]; then  # two H200s: the order alternates, since the second run of a pair has read slower
  COMMON="--steps 4 --warmup 2 --state-dtype bf16 --compile --compile-blocks"
  PRE="--layers 27 --mbs 1 --gbs 8 --ep 2 --seq 4096 --ac none"
  bench train_27l_2xh200_ep2_allgather_static 2 140 $PRE $COMMON --set parallel.ep_dispatcher=allgather
  bench train_27l_2xh200_ep2_alltoall_blocks 2 140 $PRE $COMMON --set parallel.ep_dispatcher=alltoall
  bench train_27l_2xh200_ep2_allgather_static_again 2 140 $PRE $COMMON --set parallel.ep_dispatcher=allgather
  bench sft_packed_8k_27l_2xh200_ep2_allgather_static_ac17 2 140 --layers 27 --mbs 1 --gbs 8 --ep 2 --seq 8192 \
    --attention varlen --packed 8 --ac full --ac-layers 17 $COMMON --set parallel.ep_dispatcher=allgather
fi
if [ "$MODE" = two-i ]; then  # two H200s, blocks compiled: precision fp8 against bf16 for both two-GPU targets
  COMMON="--steps 4 --warmup 2 --state-dtype bf16 --compile --compile-blocks --set parallel.ep_dispatcher=allgather"
  SFT="--layers 27 --mbs 1 --gbs 8 --ep 2 --seq 8192 --attention varlen --packed 8 --ac full --ac-layers 17"
  PRE="--layers 27 --mbs 1 --gbs 8 --ep 2 --seq 4096 --ac none"
  # FP8 weight copies kept for the step would add ~17 GiB per GPU to runs already at 130: quantised per use here.
  bench train_27l_2xh200_ep2_allgather_blocks_fp8 2 140 $PRE $COMMON --precision fp8 --set fp8_cache_weights=false
  bench train_27l_2xh200_ep2_allgather_blocks_bf16 2 140 $PRE $COMMON
  bench sft_packed_8k_27l_2xh200_ep2_allgather_ac17_blocks_bf16 2 140 $SFT $COMMON
  bench sft_packed_8k_27l_2xh200_ep2_allgather_ac17_blocks_fp8 2 140 $SFT $COMMON --precision fp8 \
    --set fp8_cache_weights=false
fi

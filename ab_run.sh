#!/usr/bin/env bash
# ab_run.sh OUT NEWSHA kind:label ...   (untracked helper; base tree in ab_base/)
OUT=$1; NEW=$2; shift 2; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
M6="--layers 6 --mbs 2 --seq 4096 --steps 8 --warmup 4 --state-dtype bf16 --compile --compile-blocks"
A6="--layers 6 --mbs 1 --gbs 4 --seq 4096 --steps 6 --warmup 2 --state-dtype bf16 --compile --compile-blocks"
L20="--layers 20 --experts 8 --engine fsdp --mbs 1 --gbs 4 --seq 4096 --state-dtype bf16 --compile --compile-blocks --steps 6 --warmup 2 --ac none"
for spec in "$@"; do
  kind=${spec%%:*}; label=${spec#*:}
  case $kind in
    base6m2) dir=ab_base; sha=eb78e1d; args="$M6";;
    new6m2) dir=.; sha=$NEW; args="$M6";;
    new6m2hf) dir=.; sha=$NEW; args="$M6 --hf-baseline";;
    base6) dir=ab_base; sha=eb78e1d; args="$A6";;
    new6) dir=.; sha=$NEW; args="$A6";;
    base20) dir=ab_base; sha=eb78e1d; args="$L20";;
    new20) dir=.; sha=$NEW; args="$L20";;
  esac
  start=$(date +%s)
  (cd $dir && PYTHONPATH=$PWD MOONFORGE_COMMIT=$sha timeout 300 torchrun --standalone --nproc_per_node 1 \
     benchmarks/train_bench.py --label "$label" --out "$OUT/$label.json" $args > "/tmp/$label.log" 2>&1); rc=$?
  grep -q "\"tflops_per_gpu\"" /tmp/$label.log || tail -5 /tmp/$label.log
  [ -n "${TORCH_LOGS:-}" ] && { echo "recompiles: $(grep -c 'Recompiling function' /tmp/$label.log)"; grep -A3 'Recompiling function' /tmp/$label.log | grep -v "^--" | cut -c1-220 | sort | uniq -c | sort -rn | head -12; }
  echo "$label ($kind $sha) rc=$rc $(( $(date +%s) - start ))s $(grep -E '"(tflops_per_gpu|step_time_s_median|peak_memory_gib|speedup|error)"' "/tmp/$label.log" | tr -d ' \n')"
done

#!/bin/bash
# H200 run 2026-12-03, call 3: --multistep with the engine's own per-jit command-buffer option (no XLA_FLAGS):
# every offload mode at 32K B=8, 128K B=8, 32K B=1 (in that order)
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
B=(--shapes paper8b --warmup 3 --prefill 0 --hf-peer 0 --host-gb 60 --transfers zero-copy --steps 32 --skip-resident-max
   --cache4k --cache4k-max-rows 16 --variants "" --multistep --max-batch 8)
run() {
  local name=$1 secs=$2; shift 2
  echo "=== $name $(date -u +%T)"
  timeout $((secs + 40)) env "$@" --budget-s $secs --out $R/$name > $R/$name.log 2>&1
  echo "rc $? $(date -u +%T)"; grep "tok/s\|largest\|summary\|rror" $R/$name.log | cut -c1-400
  cp $R/$name/engine_bench*.json $OUT/$name.json 2>/dev/null
  cp $R/$name/decode_paper8b.png $OUT/$name.png 2>/dev/null
}
R=$(mktemp -d)  # scratch folder (/tmp/r when this call ran)
run multistep_32k_b8 205 python3 -m infer.bench "${B[@]}" --contexts 32768 --batches 8 --extra-batches 8 \
  --modes sparda,sparse-offload,sparda-offload
run multistep_128k_b8 210 python3 -m infer.bench "${B[@]}" --contexts 131072 --batches 8 --extra-batches 8 \
  --modes sparse-offload,sparda-offload
run multistep_32k_b1 130 python3 -m infer.bench "${B[@]}" --contexts 32768 --batches 1 --max-batch 1 --extra-batches 1 \
  --modes sparse-offload,sparda-offload
cat $R/*.log | gzip > $OUT/logs.txt.gz

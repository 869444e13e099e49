#!/bin/bash
# H200 run 2026-12-03, call 1: multi-step greedy programs (--multistep) against per-step dispatch, 32K B=1,8 and 128K B=8
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
B=(--shapes paper8b --warmup 3 --prefill 0 --hf-peer 0 --host-gb 60 --transfers zero-copy --steps 32 --skip-resident-max
   --cache4k --cache4k-max-rows 16 --variants "" --multistep --modes sparda,sparse-offload,sparda-offload)
run() {
  local name=$1 secs=$2; shift 2
  echo "=== $name $(date -u +%T)"
  timeout $((secs + 40)) env "$@" --budget-s $secs --out $R/$name > $R/$name.log 2>&1
  echo "rc $? $(date -u +%T)"; grep "tok/s\|largest\|summary" $R/$name.log
  cp $R/$name/engine_bench*.json $OUT/$name.json 2>/dev/null
  cp $R/$name/decode_paper8b.png $OUT/$name.png 2>/dev/null
}
R=$(mktemp -d)  # scratch folder (/tmp/r when this call ran)
run multistep_32k 330 python3 -m infer.bench "${B[@]}" --contexts 32768 --batches 1,8 --max-batch 8 --extra-batches 1,8 --profile
run multistep_128k_b8 170 python3 -m infer.bench "${B[@]}" --contexts 131072 --batches 8 --max-batch 8 --extra-batches 8
cp $R/multistep_32k/profiles/paper8b_32768_8_sparda-offload_zero-copy_96.png $OUT/profile_32k_b8_default.png 2>/dev/null
cp $R/multistep_32k/profiles/paper8b_32768_8_sparda-offload_zero-copy_96_multistep.png $OUT/profile_32k_b8_multistep.png 2>/dev/null
cat $R/*.log | gzip > $OUT/logs.txt.gz

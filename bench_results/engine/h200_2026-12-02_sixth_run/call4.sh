#!/bin/bash
# sixth H200 run, call 4: step outputs through the donated state (no fresh output buffers)
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
B=(--shapes paper8b --warmup 3 --prefill 0 --hf-peer 0 --host-gb 60 --transfers zero-copy --steps 6 --skip-resident-max
   --cache4k --cache4k-max-rows 16 --variants "")
run() {
  local name=$1 secs=$2; shift 2
  echo "=== $name $(date -u +%T)"
  timeout $((secs + 40)) env "$@" --budget-s $secs --out $R/$name > $R/$name.log 2>&1
  echo "rc $? $(date -u +%T)"; grep "tok/s\|largest" $R/$name.log
  cp $R/$name/engine_bench*.json $OUT/$name.json 2>/dev/null
  cp $R/$name/decode_paper8b.png $OUT/$name.png 2>/dev/null
}
R=$(mktemp -d)  # scratch folder (/tmp/r when this call ran)
run donated_32k 200 python3 -m infer.bench "${B[@]}" --contexts 32768 --batches 1,8 --max-batch 8 --extra-batches 1,8 --modes sparse-offload,sparda-offload --profile
run donated_128k_b8 150 python3 -m infer.bench "${B[@]}" --contexts 131072 --batches 8 --max-batch 8 --extra-batches 8 --modes sparda-offload
cat $R/*.log > $OUT/logs.txt

#!/bin/bash
# sixth H200 run, call 1: SKIP_TEMP, no command buffers, and the vlog of the moving allocation
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
B=(--shapes paper8b --warmup 3 --prefill 0 --hf-peer 0 --host-gb 60 --transfers zero-copy --steps 6 --skip-resident-max
   --max-batch 8 --cache4k --cache4k-max-rows 16 --variants "")
run() {  # name, seconds, then env assignments / extra args via "$@"
  local name=$1 secs=$2; shift 2
  echo "=== $name $(date -u +%T)"
  timeout $((secs + 40)) env "$@" --budget-s $secs --out $R/$name > $R/$name.log 2>&1
  echo "rc $? $(date -u +%T)"; grep "tok/s" $R/$name.log
  cp $R/$name/engine_bench*.json $OUT/$name.json 2>/dev/null
}
R=$(mktemp -d)  # scratch folder (/tmp/r when this call ran)
ls -la $OUT
run default_b8 130 python3 -m infer.bench "${B[@]}" --batches 8 --extra-batches 8 --profile --contexts 32768 --modes sparda-offload
run nocmdbuf_b1 110 XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 -m infer.bench "${B[@]}" --batches 1 --extra-batches 1 --contexts 32768 --modes sparda-offload
run default_b1 110 python3 -m infer.bench "${B[@]}" --batches 1 --extra-batches 1 --contexts 32768 --modes sparda-offload
run nocmdbuf_64k_b8 150 XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 -m infer.bench "${B[@]}" --contexts 65536 --batches 8 --extra-batches 8 --modes sparse-offload,sparda-offload
cat $R/*.log > $OUT/logs.txt
ls -la $OUT

#!/bin/bash
# sixth H200 run, call 1: SKIP_TEMP, no command buffers, and the vlog of the moving allocation
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
B=(--shapes paper8b --warmup 3 --prefill 0 --hf-peer 0 --host-gb 60 --transfers zero-copy --steps 6 --skip-resident-max
   --contexts 32768 --max-batch 8 --cache4k --cache4k-max-rows 16 --modes sparda-offload --variants "")
run() {  # name, seconds, then env assignments / extra args via "$@"
  local name=$1 secs=$2; shift 2
  echo "=== $name $(date -u +%T)"
  timeout $((secs + 40)) env "$@" --budget-s $secs --out $R/$name > $R/$name.log 2>&1
  echo "rc $? $(date -u +%T)"; grep "tok/s" $R/$name.log
  cp $R/$name/engine_bench*.json $OUT/$name.json 2>/dev/null
}
R=$(mktemp -d)  # scratch folder (/tmp/r when this call ran)
run skiptemp_b8 150 XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP python3 -m infer.bench "${B[@]}" --batches 8 --extra-batches 8 --profile
run nocmdbuf_b8 130 XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 -m infer.bench "${B[@]}" --batches 8 --extra-batches 8 --profile
run skiptemp_b1 120 XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP python3 -m infer.bench "${B[@]}" --batches 1 --extra-batches 1
run vlog_b8 130 TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=gpu_executable=3,command_buffer_thunk=3,command_executor=3 python3 -m infer.bench "${B[@]}" --batches 8 --extra-batches 8
gzip -c $R/vlog_b8.log > $OUT/vlog_b8.txt.gz
cat $R/skiptemp_b8.log $R/nocmdbuf_b8.log $R/skiptemp_b1.log > $OUT/logs.txt
ls -la $OUT

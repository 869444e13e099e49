#!/bin/bash
# H200 run 2026-12-03, call 2: multi-step programs with WHILE/CONDITIONAL allowed in CUDA graphs (call 1 showed the
# fori_loop run from the host, one predicate read and enqueue per step)
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
B=(--shapes paper8b --warmup 3 --prefill 0 --hf-peer 0 --host-gb 60 --transfers zero-copy --steps 32 --skip-resident-max
   --cache4k --cache4k-max-rows 16 --variants "" --multistep --contexts 32768 --max-batch 8)
WHILE="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
run() {
  local name=$1 secs=$2; shift 2
  echo "=== $name $(date -u +%T)"
  timeout $((secs + 40)) env "$@" --budget-s $secs --out $R/$name > $R/$name.log 2>&1
  echo "rc $? $(date -u +%T)"; grep "tok/s\|largest\|summary\|rror" $R/$name.log | cut -c1-400
  cp $R/$name/engine_bench*.json $OUT/$name.json 2>/dev/null
}
R=$(mktemp -d)  # scratch folder (/tmp/r when this call ran)
run while_32k_b1 170 XLA_FLAGS=$WHILE python3 -m infer.bench "${B[@]}" --batches 1 --extra-batches 1 \
  --modes sparda-offload --profile
run while_32k_b8 260 XLA_FLAGS=$WHILE python3 -m infer.bench "${B[@]}" --batches 8 --extra-batches 8 \
  --modes sparse-offload,sparda-offload --profile
cp $R/while_32k_b1/profiles/*_multistep.png $OUT/ 2>/dev/null
cat $R/*.log | gzip > $OUT/logs.txt.gz

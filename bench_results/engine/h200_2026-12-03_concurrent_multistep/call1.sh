#!/bin/bash
# H200 run 2026-12-03 (second session), call 1: CONCURRENT graph order inside the multi-step programs, and the
# sampled programs, 32K B=8 (k slots and the 4k-slot table), with profiles
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
B=(--shapes paper8b --warmup 3 --prefill 0 --hf-peer 0 --host-gb 60 --transfers zero-copy --steps 32 --skip-resident-max
   --cache4k --cache4k-max-rows 16 --multistep --max-batch 8)
run() {
  local name=$1 secs=$2; shift 2
  echo "=== $name $(date -u +%T)"
  timeout $((secs + 40)) env "$@" --budget-s $secs --out $R/$name > $R/$name.log 2>&1
  echo "rc $? $(date -u +%T)"; grep "tok/s\|largest\|summary\|rror" $R/$name.log | cut -c1-400
  cp $R/$name/engine_bench*.json $OUT/$name.json 2>/dev/null
  cp $R/$name/decode_paper8b.png $OUT/$name.png 2>/dev/null
  for f in $R/$name/profiles/*.png; do [ -e "$f" ] && cp "$f" $OUT/${name}_$(basename $f | tr "+" "_"); done
}
R=$(mktemp -d)  # scratch folder (/tmp/r when this call ran)
run concurrent_32k_b8 500 python3 -m infer.bench "${B[@]}" --contexts 32768 --batches 8 --extra-batches 8 \
  --modes sparda-offload --profile \
  --variants "concurrent+multistep,cache4k+table+concurrent+multistep,cache4k+table+sampled+multistep"
cat $R/*.log | gzip > $OUT/logs.txt.gz

#!/bin/bash
# H200 run 2026-12-03 (second session), call 3: the sort-free sampler in the multi-step programs (32K B=8 with a profile, 32K B=1),
# and CONCURRENT multi-step programs at 128K B=8
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
run sampled_32k_b8 170 python3 -m infer.bench "${B[@]}" --contexts 32768 --batches 8 --extra-batches 8 \
  --modes sparda-offload --only-variants --profile \
  --variants "cache4k+table+sampled+multistep,cache4k+table+concurrent+sampled+multistep"
run sampled_32k_b1 100 python3 -m infer.bench "${B[@]}" --contexts 32768 --batches 1 --max-batch 1 --extra-batches 1 \
  --modes sparda-offload --only-variants --variants "cache4k+table+concurrent+sampled+multistep"
run concurrent_128k_b8 230 python3 -m infer.bench "${B[@]}" --contexts 131072 --batches 8 --extra-batches 8 \
  --modes sparda-offload --only-variants --variants "concurrent+multistep,cache4k+table+concurrent+multistep"
cat $R/*.log | gzip > $OUT/logs.txt.gz

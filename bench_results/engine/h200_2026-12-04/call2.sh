#!/bin/bash
# H200 run 2026-12-04, call 2 (32K B=8, multi-step programs, CONCURRENT graph order, profiled): the prefetch's index
# arrays held live to the end of the issuing layer (variant keep) against the default, at k slots and with the
# 4k-slot table cache.
source scripts/device_bench.sh
B=(--shapes paper8b --warmup 3 --prefill 0 --hf-peer 0 --host-gb 60 --transfers zero-copy --steps 32 --skip-resident-max
   --cache4k --cache4k-max-rows 16 --multistep --max-batch 8)
bench keep_32k_b8 330 "${B[@]}" --contexts 32768 --batches 8 --extra-batches 8 --modes sparda-offload --profile \
  --only-variants --variants multistep,keep+multistep,cache4k+table+keep+multistep
bench_logs

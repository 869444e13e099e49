#!/bin/bash
# H200 run 2026-12-04, call 4 (multi-step programs, fills' inputs held live): the persistent fill's program count
# and the persistent fill with the 4k-slot table at 32K B=8; 32K B=1 and 128K B=8: both offload modes, grid and
# persistent.
source scripts/device_bench.sh
B=(--shapes paper8b --warmup 3 --prefill 0 --hf-peer 0 --host-gb 60 --transfers zero-copy --steps 32 --skip-resident-max
   --cache4k-max-rows 16 --multistep --max-batch 8)
bench programs_32k_b8 160 "${B[@]}" --contexts 32768 --batches 8 --extra-batches 8 --modes sparda-offload \
  --only-variants --variants persistent16+multistep,persistent64+multistep,cache4k+table+persistent+multistep
bench persistent_32k_b1 140 "${B[@]}" --contexts 32768 --batches 1 --max-batch 1 --extra-batches 1 \
  --modes sparse-offload,sparda-offload --variants persistent+multistep
bench persistent_128k_b8 180 "${B[@]}" --contexts 131072 --batches 8 --extra-batches 8 \
  --modes sparse-offload,sparda-offload --variants persistent+multistep
bench_logs

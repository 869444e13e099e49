#!/bin/bash
# H200 run 2026-12-04, call 3 (32K B=8, profiled): everything as multi-step programs, the fills' inputs held live
# (the new default), the resident bound timed as multi-step programs too; both offload modes at k slots and with the
# 4k-slot table cache; the persistent fill (32 programs) beside the held inputs.
source scripts/device_bench.sh
B=(--shapes paper8b --warmup 3 --prefill 0 --hf-peer 0 --host-gb 60 --transfers zero-copy --steps 32 --skip-resident-max
   --cache4k --cache4k-max-rows 16 --multistep --max-batch 8 --profile)
bench held_32k_b8 470 "${B[@]}" --contexts 32768 --batches 8 --extra-batches 8 \
  --modes sparda,sparse-offload,sparda-offload --variants persistent+multistep
bench_logs

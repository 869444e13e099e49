#!/bin/bash
# H200 run 2026-12-04, call 1 (32K B=8, multi-step programs, CONCURRENT graph order): the persistent fill kernel
# (32 and 64 programs) at k slots and with the 4k-slot table cache, against the grid fill, and sparse-offload with
# the same 4k-slot cache (the like-for-like baseline for the cache).
source scripts/device_bench.sh
B=(--shapes paper8b --warmup 3 --prefill 0 --hf-peer 0 --host-gb 60 --transfers zero-copy --steps 32 --skip-resident-max
   --cache4k --cache4k-max-rows 16 --multistep --max-batch 8)
bench persistent_32k_b8 500 "${B[@]}" --contexts 32768 --batches 8 --extra-batches 8 \
  --modes sparse-offload,sparda-offload \
  --variants persistent+multistep,persistent64+multistep,cache4k+table+persistent+multistep
bench_logs

#!/bin/bash
# H200 run 2026-12-04 (second session), call 4: the Llama-3.1-8B shape at 64K and 128K, each at the largest batch
# the 60 GB pinned host store holds (6 and 3), both offload modes at k slots (fill kernel "auto").
source scripts/device_bench.sh
B=(--shapes llama31_8b --warmup 3 --prefill 0 --hf-peer 0 --host-gb 60 --transfers zero-copy --steps 32 --skip-resident-max
   --multistep --max-batch 8 --variants "" --modes sparse-offload,sparda-offload)
bench llama_64k_b6 150 "${B[@]}" --contexts 65536 --batches 6 --extra-batches 6
bench llama_128k_b3 150 "${B[@]}" --contexts 131072 --batches 3 --extra-batches 3

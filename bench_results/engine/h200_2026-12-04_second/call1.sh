#!/bin/bash
# H200 run 2026-12-04 (second session), call 1: which fill kernel is the default (grid or persistent, fills' inputs
# held) -- 32K B=8 at k slots and with the 4k-slot table cache, 32K B=1, 128K B=8; and is the resident multi-step
# program's loop in the CUDA graph once DYNAMIC_SLICE_FUSION is among the command-buffer types.
source scripts/device_bench.sh
B=(--shapes paper8b --warmup 3 --prefill 0 --hf-peer 0 --host-gb 60 --transfers zero-copy --steps 32 --skip-resident-max
   --cache4k --cache4k-max-rows 16 --multistep --max-batch 8)
bench fill_32k_b8 190 "${B[@]}" --contexts 32768 --batches 8 --extra-batches 8 --modes sparda-offload \
  --only-variants --variants multistep,persistent+multistep,cache4k+table+persistent+multistep
bench persistent_32k_b1 70 "${B[@]}" --contexts 32768 --batches 1 --max-batch 1 --extra-batches 1 \
  --modes sparda-offload --only-variants --variants persistent+multistep
bench persistent_128k_b8 90 "${B[@]}" --contexts 131072 --batches 8 --extra-batches 8 \
  --modes sparda-offload --only-variants --variants persistent+multistep
export XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL,DYNAMIC_SLICE_FUSION
bench resident_dsf_32k_b8 120 "${B[@]}" --contexts 32768 --batches 8 --extra-batches 8 --modes sparda
unset XLA_FLAGS
bench_logs

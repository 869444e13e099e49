#!/bin/bash
# H200 run 2026-12-04 (second session), call 2: the resident multi-step program's optimized HLO and XLA's
# command-buffer logs (why its loop runs from the host); sparse-offload with the persistent fill (is grid its faster
# kernel?); the Llama-3.1-8B shape at 32K B=8 (fill kernel "auto": persistent for sparda-offload).
source scripts/device_bench.sh
B=(--shapes paper8b --warmup 3 --prefill 0 --hf-peer 0 --host-gb 60 --transfers zero-copy --steps 32 --skip-resident-max
   --cache4k --cache4k-max-rows 16 --multistep --max-batch 8 --variants "")
DUMP=$(mktemp -d)
export XLA_FLAGS="--xla_dump_to=$DUMP --xla_dump_hlo_module_re=.*greedy_steps.* --xla_dump_hlo_as_text"
export TF_CPP_VMODULE=command_buffer_conversion_pass=2,command_buffer_scheduling=2 TF_CPP_MIN_LOG_LEVEL=0
bench resident_dump_32k_b8 70 "${B[@]}" --contexts 32768 --batches 8 --extra-batches 8 --modes sparda
unset XLA_FLAGS TF_CPP_VMODULE TF_CPP_MIN_LOG_LEVEL
ls -la "$DUMP" | head -30
grep -ci "command.buffer" "$BENCH_SCRATCH/resident_dump_32k_b8.log"
tar czf "$OUT/resident_dump.tgz" -C "$DUMP" . && ls -la "$OUT/resident_dump.tgz"
bench sparse_persistent_32k_b8 60 "${B[@]}" --contexts 32768 --batches 8 --extra-batches 8 --modes sparse-offload \
  --variant-modes sparse-offload --only-variants --variants persistent+multistep
bench llama_32k_b8 300 "${B[@]}" --shapes llama31_8b --cache4k-max-rows 64 --contexts 32768 --batches 8 \
  --extra-batches 8 --modes sparda,sparse-offload,sparda-offload
bench_logs

#!/bin/bash
# H200 run 2026-12-04 (second session), call 3: XLA's command-buffer conversion log (and HLO dump) of the resident
# multi-step program, with the budget call 2 lacked; sparse-offload with the persistent fill; paper 8B at 64K B=8.
source scripts/device_bench.sh
B=(--shapes paper8b --warmup 3 --prefill 0 --hf-peer 0 --host-gb 60 --transfers zero-copy --steps 32 --skip-resident-max
   --cache4k --cache4k-max-rows 16 --multistep --max-batch 8 --variants "")
DUMP=$(mktemp -d)
export XLA_FLAGS="--xla_dump_to=$DUMP --xla_dump_hlo_module_re=.*greedy_steps.* --xla_dump_hlo_as_text"
export TF_CPP_VMODULE=command_buffer_conversion_pass=2 TF_CPP_MIN_LOG_LEVEL=0
bench resident_log_32k_b8 120 "${B[@]}" --contexts 32768 --batches 8 --extra-batches 8 --modes sparda
unset XLA_FLAGS TF_CPP_VMODULE TF_CPP_MIN_LOG_LEVEL
grep "command_buffer_conversion_pass" "$BENCH_SCRATCH/resident_log_32k_b8.log" | grep -v "min graph size" | grep -v "lowering is not enabled by the user for type FUSION\|for type CUBLASLT" | cut -c1-600 | gzip > "$OUT/resident_cb_log.txt.gz"
zcat "$OUT/resident_cb_log.txt.gz" | grep -v "Creating command buffer" | cut -c1-300 | tail -40
rm -f "$DUMP"/*.pbtxt; tar czf "$OUT/resident_dump.tgz" -C "$DUMP" . && ls -la "$OUT/resident_dump.tgz"
bench sparse_persistent_32k_b8 110 "${B[@]}" --contexts 32768 --batches 8 --extra-batches 8 --modes sparse-offload \
  --variant-modes sparse-offload --only-variants --variants persistent+multistep
bench paper_64k_b8 230 "${B[@]}" --contexts 65536 --batches 8 --extra-batches 8 --modes sparse-offload,sparda-offload

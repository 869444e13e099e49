# Sourced by the device-call scripts under bench_results/ (`source scripts/device_bench.sh`), on the GPU machine.
# bench NAME SECONDS ARGS...: runs `python3 -m infer.bench ARGS --budget-s SECONDS` into a scratch folder, prints its
# result lines, and copies the JSON, the plot and the profile timelines to $OUT as NAME.json / NAME.png /
# NAME_<profile>.png ('+' becomes '_': the device tool refuses names with '+'). bench_logs: all logs into
# $OUT/logs.txt.gz (call it last).
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 PYTHONPATH=.
BENCH_SCRATCH=$(mktemp -d)
# Each bench is its own process; a call's runs of one shape share matmul shapes and often whole programs, so their
# compiles and XLA's autotuning (most of a run's device time: 20-40 s, H200 2026-12-04) are cached on the machine's
# disk for the call's later runs. XLA_FLAGS set before sourcing are kept; a call script that sets XLA_FLAGS later
# adds to this value.
export JAX_COMPILATION_CACHE_DIR=$BENCH_SCRATCH/jax_cache
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_per_fusion_autotune_cache_dir=$BENCH_SCRATCH/autotune"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

bench() {
  local name=$1 secs=$2; shift 2
  local dir=$BENCH_SCRATCH/$name
  echo "=== $name $(date -u +%T)"
  # The budget stops the plan; the timeout only catches a hang (compiles of one run take up to ~70 s).
  timeout $((secs + 60)) python3 -m infer.bench "$@" --budget-s "$secs" --out "$dir" > "$dir.log" 2>&1
  echo "rc $? $(date -u +%T)"
  grep "tok/s\|largest\|summary\|rror" "$dir.log" | cut -c1-400
  cp "$dir"/engine_bench*.json "$OUT/$name.json" 2>/dev/null
  cp "$dir"/decode_*.png "$OUT/$name.png" 2>/dev/null
  for f in "$dir"/profiles/*.png; do [ -e "$f" ] && cp "$f" "$OUT/${name}_$(basename "$f" | tr '+' '_')"; done
  return 0
}

bench_logs() {
  cat "$BENCH_SCRATCH"/*.log | gzip > "$OUT/logs.txt.gz"
}

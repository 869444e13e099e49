"""The goal ratios `python -m infer.bench` reports, on a hand-made result with hand-computed answers."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from infer.bench import Run, fill_transfer, summarize


def _run(mode, batch, step_s, transfer="", variant="", mb=0.0, slots=0):
    r = Run("s", mode, 1024, batch, transfer, slots, step_s=step_s, tok_s=batch / step_s, mb_per_step=mb,
            variant=variant)
    return dataclasses.asdict(r)


def test_summary_ratios():
    runs = [_run("sparse", 2, 0.004), _run("sparda", 2, 0.005),
            _run("sparse-offload", 2, 0.020, "zero-copy", mb=520.0, slots=96),
            _run("sparda-offload", 2, 0.010, "zero-copy", mb=520.0, slots=96),
            _run("sparda-offload", 2, 0.008, "zero-copy", "nofetch", mb=520.0, slots=96),
            _run("sparda-offload", 2, 0.009, "zero-copy", slots=384),  # a cache larger than k: not the k-slot mode
            _run("sparda-offload", 2, 0.005, "zero-copy", "table", slots=384),
            _run("sparse-offload", 2, 0.0125, "zero-copy", "table", slots=384),  # the baseline with the same cache
            _run("sparda-offload", 8, 0.016, "zero-copy", mb=52.0, slots=96),
            _run("sparda-offload", 8, 0.004, "zero-copy", "nofetch", slots=96),
            dict(_run("sparse", 8, 0.001), error="OOM"),
            # --multistep: compared only with each other
            _run("sparse-offload", 2, 0.016, "zero-copy", "multistep", mb=520.0, slots=96),
            _run("sparda-offload", 2, 0.0125, "zero-copy", "multistep", mb=520.0, slots=96),
            _run("sparda-offload", 2, 0.004, "zero-copy", "table+multistep", slots=384),
            _run("sparda", 2, 0.003, variant="multistep"),  # faster than its single steps: the bound
            _run("sparse", 2, 0.010, variant="multistep")]
    rows = summarize({"runs": runs, "top_k_blocks": 96}, pcie_gbps=52.0)
    b2, b8, best, best_multistep = rows
    assert b2["sparda_vs_sparse_offload"] == pytest.approx(2.0)
    # 10 ms against max(resident sparda 5 ms, 520 MB at 52 GB/s = 10 ms)
    assert b2["step_vs_bound"] == pytest.approx(1.0) and b2["bound_from"] == "resident sparda single steps"
    assert b2["bound_term"] == "pcie"
    assert b2["ratio_ceiling"] == pytest.approx(2.0)  # sparse-offload's 20 ms against the 10 ms bound
    # the table run moves nothing: 5 ms against the resident 5 ms
    assert b2["cache_step_vs_bound"] == pytest.approx(1.0)
    assert b2["exposed_copy_ms"] == pytest.approx(2.0)
    # the fastest block-cache run (table, 5 ms) against sparse-offload's 20 ms
    assert b2["cache_vs_sparse_offload"] == pytest.approx(4.0) and b2["cache_slots"] == 384
    assert b2["cache_vs_cached_sparse_offload"] == pytest.approx(2.5)  # 12.5 ms with the same 384 slots
    assert "cache_vs_cached_sparse_offload_multistep" not in b2  # no cached multi-step baseline
    assert b2["sparda_vs_sparse_offload_multistep"] == pytest.approx(1.28)
    assert b2["cache_vs_sparse_offload_multistep"] == pytest.approx(4.0)
    # 12.5 ms against max(the multi-step resident 3 ms, 10 ms of PCIe); the table run moves nothing: 4 / 3 ms
    assert b2["step_vs_bound_multistep"] == pytest.approx(1.25) and b2["bound_term_multistep"] == "pcie"
    assert b2["bound_from_multistep"] == "resident sparda multistep"
    assert b2["ratio_ceiling_multistep"] == pytest.approx(1.6)  # 16 ms against the 10 ms bound
    assert b2["cache_step_vs_bound_multistep"] == pytest.approx(4 / 3)
    # no resident run at B=8: the bound is max(nofetch 4 ms, 1 ms of PCIe)
    assert b8["step_vs_bound"] == pytest.approx(4.0) and b8["bound_from"] == "nofetch"
    assert b8["bound_term"] == "gpu step"
    assert "sparda_vs_sparse_offload" not in b8 and "cache_vs_sparse_offload" not in b8 and "ratio_ceiling" not in b8
    assert not any(key.endswith("_multistep") for key in b8)
    # best sparda-offload (k slots, no variant) 8 / 0.016 = 500 tok/s vs best resident sparse 2 / 0.004 = 500 tok/s
    assert best["best_throughput_ratio"] == pytest.approx(1.0) and best["batches_run"] == [2, 8]
    assert best["timing"] == "single steps"
    # multi-step: sparda-offload 2 / 0.0125 = 160 tok/s against the multi-step resident sparse 2 / 0.010 = 200
    assert best_multistep["best_throughput_ratio"] == pytest.approx(0.8) and best_multistep["timing"] == "multistep"


def test_fill_transfer_from_a_profile():
    # 100 MB filled in 2 ms, 0.5 ms of it beside other kernels: 50 GB/s, 1.5 ms exposed, a quarter hidden
    copy_s, exposed_s, gbps, hidden = fill_transfer({"fill_us_per_step": 2000.0, "fill_hidden_us_per_step": 500.0},
                                                    100.0)
    assert (copy_s, exposed_s, gbps, hidden) == pytest.approx((2e-3, 1.5e-3, 50.0, 0.25))


def test_bench_runs_end_to_end_on_cpu(tmp_path):
    # Not a timing: the script's plan, both offload modes, the JSON, the summary and the plot work on the tiny shape.
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "infer.bench", "--shapes", "tiny", "--contexts", "2048", "--batches",
                           "1", "--max-batch", "1", "--host-gb", "0.01", "--top-k-blocks", "16", "--local-blocks", "4",
                           "--transfers", "zero-copy", "--variants", "nofetch,table", "--extra-batches", "1",
                           "--steps", "1", "--warmup", "1", "--prefill", "0", "--hf-peer", "0", "--profile",
                           "--cache4k", "--cache-warmup", "3",
                           "--out", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "engine_bench_tiny.json").read_text())
    runs = {(r["mode"], r["variant"], r["cache_slots"]): r for r in result["runs"]}
    # the 4k-slot cache (64 slots) runs with the table lookup only, for both offload modes
    assert set(runs) == {("sparse-offload", "", 16), ("sparda-offload", "", 16), ("sparda-offload", "nofetch", 16),
                         ("sparda-offload", "table", 16), ("sparda-offload", "table", 64),
                         ("sparse-offload", "table", 64)}
    # the two slot lookups are one policy: the same selections hit and miss alike
    assert runs[("sparda-offload", "table", 16)]["hit_rate"] == runs[("sparda-offload", "", 16)]["hit_rate"]
    assert all(not r["error"] and r["tok_s"] > 0 and 0 < r["hit_rate"] <= 1 for r in runs.values())
    assert all(r["replay"] == "trace" for r in runs.values())  # drawn before the timed steps by default
    assert all(r["step_compiles"] == 1 for r in runs.values())  # numpy, then device tokens: one executable
    assert all(r["program_compiles"] == 0 for r in runs.values())  # not --multistep
    # --profile traced every run; a CPU trace has no GPU streams, which the summary reports
    assert all(r["profile"]["error"] == "no GPU stream events in the trace" for r in runs.values())
    assert result["summary"][0]["bound_from"] == "nofetch" and (tmp_path / "decode_tiny.png").exists()


def test_bench_modes_filter_and_multistep(tmp_path):
    root = Path(__file__).resolve().parents[1]
    common = [sys.executable, "-m", "infer.bench", "--shapes", "tiny", "--contexts", "2048", "--batches", "1",
              "--max-batch", "1", "--host-gb", "0.01", "--top-k-blocks", "16", "--local-blocks", "4", "--transfers",
              "zero-copy", "--variants", "", "--extra-batches", "0", "--steps", "1", "--warmup", "1", "--prefill", "0",
              "--hf-peer", "0", "--skip-resident-max", "--out", str(tmp_path)]
    # a variant that already names its timing keeps it: sampled multi-step programs with the 4k-slot cache beside
    # the greedy k-slot ones
    proc = subprocess.run(common + ["--modes", "sparda-offload", "--multistep", "--extra-batches", "1", "--variants",
                                    "cache4k+table+sampled+multistep", "--cache-warmup", "3"],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads((tmp_path / "engine_bench_tiny.json").read_text())["runs"]
    assert [(r["mode"], r["variant"], r["cache_slots"]) for r in runs] == [
        ("sparda-offload", "multistep", 16), ("sparda-offload", "cache4k+table+sampled+multistep", 64)]
    # one executable per program kind, whatever the program lengths (1-step, warm-up and timed calls), and no
    # single step compiled beside it
    assert all(not r["error"] and r["tok_s"] > 0 and r["step_compiles"] == 0 and r["program_compiles"] == 1
               for r in runs)
    proc = subprocess.run(common + ["--modes", "sparda-offload", "--only-variants", "--variants",
                                    "concurrent+multistep", "--extra-batches", "1"],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads((tmp_path / "engine_bench_tiny.json").read_text())["runs"]
    assert [(r["mode"], r["variant"], r["cache_slots"]) for r in runs] == [
        ("sparda-offload", "concurrent+multistep", 16)]
    bad = subprocess.run(common + ["--modes", "sparda,offload"], cwd=root, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "unknown mode(s) offload" in bad.stderr.strip().splitlines()[-1]


def test_resident_run_times_multi_step_programs():
    # The CPU plan has no resident runs (no device memory to size them), so the --multistep resident run directly.
    import jax.numpy as jnp

    from infer.bench import random_model, resident_run
    from sparda_jax.config import SparseConfig

    model = random_model("tiny", jnp.float32)
    r = resident_run(model, SparseConfig(top_k_blocks=16, local_blocks=4), "tiny", "sparda", 1024, 2, 1, 2,
                     multistep=True)
    assert r.variant == "multistep" and r.tok_s > 0 and r.step_compiles == 0 and r.program_compiles == 1
    assert np.isnan(r.blocking_step_s)  # no single steps were run


def test_multistep_plan_times_resident_runs_both_ways_and_caches_both_offload_modes():
    from infer.bench import build_parser, run_plan

    a = build_parser().parse_args(["--transfers", "zero-copy", "--variants", "persistent+multistep", "--cache4k",
                                   "--cache4k-max-rows", "16", "--multistep", "--extra-batches", "8",
                                   "--skip-resident-max"])
    plan = run_plan(a, [8], b_off=8, b_res=90, num_kv_heads=2, dense=False, modes=set())
    assert plan == [
        ("resident", "sparse", 8, "", 0, ""), ("resident", "sparse", 8, "", 0, "multistep"),
        ("resident", "sparda", 8, "", 0, ""), ("resident", "sparda", 8, "", 0, "multistep"),
        ("offload", "sparse-offload", 8, "zero-copy", 0, "multistep"),
        ("offload", "sparda-offload", 8, "zero-copy", 0, "multistep"),
        ("offload", "sparse-offload", 8, "zero-copy", 384, "table+multistep"),
        ("offload", "sparda-offload", 8, "zero-copy", 384, "table+multistep"),
        ("offload", "sparda-offload", 8, "zero-copy", 0, "persistent+multistep")]
    # B=16 is not among --extra-batches: no cache or variant runs; --modes keeps only the named mode
    assert run_plan(a, [16], b_off=16, b_res=0, num_kv_heads=2, dense=False, modes={"sparse-offload"}) == [
        ("offload", "sparse-offload", 16, "zero-copy", 0, "multistep")]
    # --variant-modes: the variants in each named offload mode
    a = build_parser().parse_args(["--transfers", "zero-copy", "--variants", "grid,persistent", "--extra-batches", "8",
                                   "--variant-modes", "sparse-offload,sparda-offload", "--only-variants"])
    assert run_plan(a, [8], b_off=8, b_res=0, num_kv_heads=2, dense=False, modes=set()) == [
        ("offload", "sparse-offload", 8, "zero-copy", 0, "grid"),
        ("offload", "sparse-offload", 8, "zero-copy", 0, "persistent"),
        ("offload", "sparda-offload", 8, "zero-copy", 0, "grid"),
        ("offload", "sparda-offload", 8, "zero-copy", 0, "persistent")]


def test_a_budget_too_small_for_a_context_says_so(tmp_path):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "infer.bench", "--shapes", "tiny", "--contexts", "2048", "--batches",
                           "1", "--prefill", "0", "--hf-peer", "0", "--budget-s", "30", "--out", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "under the 60 s a context needs; context 2048 and later skipped" in proc.stdout
    assert json.loads((tmp_path / "engine_bench_tiny.json").read_text())["runs"] == []

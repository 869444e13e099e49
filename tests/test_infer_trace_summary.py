"""The profiler-trace summary behind `infer.bench --profile`, on hand-made traces with hand-computed answers."""

import jax
import jax.numpy as jnp
import pytest

from infer.trace_summary import category, find_perfetto_trace, load_trace, plot_timeline, summarize_trace


def _meta(pid, tid, pname, tname):
    return [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": pname}},
            {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": tname}}]


def _kernel(pid, tid, name, ts, dur):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}


def test_summary_of_two_streams(tmp_path):
    gpu, host = 1, 2
    events = (_meta(gpu, 10, "/device:GPU:0", "Stream #1(Compute)") + _meta(gpu, 11, "/device:GPU:0", "Stream #2")
              + _meta(gpu, 12, "/device:GPU:0", "XLA Ops") + _meta(host, 20, "/host:CPU", "python"))
    events += [
        _kernel(gpu, 10, "loop_fusion_3", 0, 10),  # compute stream: busy [0, 10) and [20, 40)
        _kernel(gpu, 10, "sparda_decode_attention", 20, 15),
        _kernel(gpu, 10, "sm90_xmma_gemm_bf16", 30, 10),  # overlaps the attention on the same stream
        _kernel(gpu, 11, "sparda_fill_slots", 5, 20),  # second stream: [5, 25)
        _kernel(gpu, 12, "fusion.3", 0, 100),  # per-op summary lane: ignored
        _kernel(host, 20, "PjitFunction(step)", 0, 100),  # host: no GPU time; no idle gap to overlap here
    ]
    s = summarize_trace({"traceEvents": events}, steps=2)
    compute = s["streams"]["/device:GPU:0 Stream #1(Compute)"]
    assert compute["busy_us_per_step"] == pytest.approx(30 / 2)
    assert compute["kernels_per_step"] == pytest.approx(1.5)
    assert compute["category_us_per_step"] == {"attention": 7.5, "other": 5.0, "matmul": 5.0}
    assert s["streams"]["/device:GPU:0 Stream #2"]["category_us_per_step"] == {"fill": 10.0}
    # all streams: busy [0, 40) = 40, span 40, idle 0; overlap [5, 10) and [20, 25) = 10
    assert s["span_us_per_step"] == pytest.approx(20.0)
    assert s["busy_us_per_step"] == pytest.approx(20.0)
    assert s["idle_us_per_step"] == pytest.approx(0.0)
    assert s["overlap_us_per_step"] == pytest.approx(5.0)
    # the fill [5, 25) runs beside compute kernels during [5, 10) and [20, 25)
    assert (s["fill_us_per_step"], s["fill_hidden_us_per_step"]) == pytest.approx((10.0, 5.0))
    assert s["host_during_idle_us_per_step"] == {}
    assert s["command_buffer"] == {}
    lanes = plot_timeline({"traceEvents": events}, tmp_path / "timeline.png", "two streams")
    assert lanes == ["/device:GPU:0 Stream #1(Compute)", "/device:GPU:0 Stream #2"]
    assert (tmp_path / "timeline.png").stat().st_size > 1000


def test_many_streams_are_plotted_by_category(tmp_path):
    # 20 streams, one kernel each (as XLA's CONCURRENT order spreads a graph): lanes become the categories present
    events = []
    for i in range(20):
        events += _meta(1, i, "/device:GPU:0", f"Stream #{i}")
        events.append(_kernel(1, i, "sparda_fill_slots" if i % 4 == 0 else "sm90_xmma_gemm_bf16", 3 * i, 5))
    lanes = plot_timeline({"traceEvents": events}, tmp_path / "t.png", "many")
    assert lanes == ["fill", "matmul"] and (tmp_path / "t.png").stat().st_size > 1000


def test_idle_gaps_and_categories():
    events = _meta(1, 1, "/device:GPU:0", "Stream #7") + [_kernel(1, 1, "input_reduce_fusion", 0, 4),
                                                          _kernel(1, 1, "MemcpyH2D", 10, 2),
                                                          _kernel(1, 1, "sort_1", 14, 6)]
    s = summarize_trace({"traceEvents": events})
    assert (s["span_us_per_step"], s["busy_us_per_step"], s["idle_us_per_step"]) == (20.0, 12.0, 8.0)
    assert s["overlap_us_per_step"] == 0.0
    assert (s["fill_us_per_step"], s["fill_hidden_us_per_step"]) == (0.0, 0.0)
    assert [category(n) for n in ("sparda_fill_slots", "cutlass_80_wmma", "scatter_2", "wrapped_cumsum", "x")] == \
           ["fill", "matmul", "scatter", "reduce", "other"]


def test_host_events_during_gpu_idle_gaps():
    gpu, host = 1, 2
    events = _meta(gpu, 1, "/device:GPU:0", "Stream #7") + _meta(host, 5, "/host:CPU", "python")
    events += [_kernel(gpu, 1, "fusion", 0, 10), _kernel(gpu, 1, "fusion", 30, 10), _kernel(gpu, 1, "fusion", 50, 10)]
    # GPU idle gaps: [10, 30) and [40, 50)
    events += [_kernel(host, 5, "CommandBufferThunk", 5, 20),  # overlaps [10, 25) = 15
               _kernel(host, 5, "CommandBufferThunk", 38, 20),  # overlaps [40, 50) = 10
               _kernel(host, 5, "PjitFunction(step)", 0, 60),  # the whole step: both gaps, 30
               _kernel(host, 5, "ParseArguments", 31, 8)]  # inside a busy stretch: absent
    s = summarize_trace({"traceEvents": events}, steps=2)
    assert s["idle_us_per_step"] == pytest.approx(15.0)
    assert s["host_during_idle_us_per_step"] == {"PjitFunction(step)": 15.0, "CommandBufferThunk": 12.5}


def test_no_gpu_events_is_reported_not_raised(tmp_path):
    # A real (CPU) profiler trace: it has no GPU streams; the summary says so and the plot is skipped.
    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        f(x).block_until_ready()
    trace = load_trace(find_perfetto_trace(tmp_path))
    assert summarize_trace(trace)["error"] == "no GPU stream events in the trace"
    plot_timeline(trace, tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()


def test_command_buffer_updates_are_counted_per_step():
    gpu, host = 1, 2
    events = _meta(gpu, 10, "/device:GPU:0", "Stream #1(Compute)") + _meta(host, 20, "/host:CPU", "python")
    events += [_kernel(gpu, 10, "fusion", 0, 5), _kernel(gpu, 10, "fusion", 50, 5)]
    events += [_kernel(host, 20, "command_buffer::update", 0, 30), _kernel(host, 20, "command_buffer::execute", 30, 4),
               _kernel(host, 20, "command_buffer::execute", 60, 6), _kernel(host, 20, "cuGraphLaunch", 61, 5)]
    s = summarize_trace({"traceEvents": events}, steps=2)
    assert s["command_buffer"] == {"command_buffer::update": {"per_step": 0.5, "us_per_step": 15.0},
                                   "command_buffer::execute": {"per_step": 1.0, "us_per_step": 5.0}}

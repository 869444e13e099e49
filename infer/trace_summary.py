"""Where a decode step's GPU time goes: a summary of a `jax.profiler` trace (its perfetto JSON), and a timeline plot.

`infer.bench --profile` traces a few steps of each run after timing them and attaches `summarize_trace` of that
trace to the run. Per GPU stream it reports the busy time (union of its kernels and copies), the time per kernel
category, the number of kernels, and, over all streams, the idle time, the time two streams ran at once (what a
second stream hides), and how long fill kernels ran and for how much of that other kernels ran beside them.
Categories come from kernel names (our Pallas kernels are named `sparda_*`).

When the GPU sits idle inside the traced span, the host was the bottleneck: `host_during_idle_us_per_step` names
the host-side trace events (jax dispatch, XLA runtime thunks, command-buffer updates...) that overlapped those idle
gaps, by how long. Nested events each count their own overlap, so the figures do not add up to the idle time.
`command_buffer` counts XLA's CUDA-graph updates and launches per step, idle or not.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

# First match wins; matched against the lower-cased kernel name.
CATEGORIES = (
    ("fill", r"sparda_fill"),
    ("attention", r"sparda_decode|sparda_prefill|sparse_decode|sparse_prefill"),
    ("copy", r"memcpy|memset|copy_start|copy_done|dynamic_update_slice_copy"),
    ("matmul", r"gemm|gemv|cublas|cutlass|xmma|nvjet|matmul|dot"),
    ("sort", r"sort"),
    ("scatter", r"scatter"),
    ("reduce", r"reduce|argmax|cumsum"),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def load_trace(path: str | Path) -> dict:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def find_perfetto_trace(log_dir: str | Path) -> Path:
    found = sorted(Path(log_dir).rglob("perfetto_trace.json*"))
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json(.gz) under {log_dir}")
    return found[-1]


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _device_threads(trace: dict) -> tuple[dict[tuple, tuple[str, str]], list[dict]]:
    """({(pid, tid): (process name, thread name)} for the threads of GPU processes, the trace's events)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    proc_names, thread_names = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            proc_names[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread_names[(e["pid"], e["tid"])] = e["args"]["name"]
    gpu_pids = {pid for pid, name in proc_names.items() if re.search(r"gpu|/device:", name, re.I)}
    return {key: (proc_names[key[0]], name) for key, name in thread_names.items() if key[0] in gpu_pids}, events


def _host_events(trace: dict) -> list[dict]:
    threads, events = _device_threads(trace)
    return [e for e in events if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) not in threads]


def _gaps(busy: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(a[1], b[0]) for a, b in zip(busy, busy[1:]) if b[0] > a[1]]


def host_during_idle(trace: dict, busy: list[tuple[float, float]], steps: int, top: int = 12) -> dict[str, float]:
    """{host event name: microseconds per step it overlapped the GPU's idle gaps}, the `top` largest."""
    gaps = _gaps(busy)
    totals: dict[str, float] = {}
    for e in _host_events(trace):
        start = float(e["ts"])
        overlap = _length(_intersection([(start, start + float(e.get("dur", 0)))], gaps))
        if overlap > 0:
            totals[e["name"]] = totals.get(e["name"], 0.0) + overlap / steps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])[:top])


def command_buffer_activity(trace: dict, steps: int) -> dict[str, dict[str, float]]:
    """{XLA command-buffer event ("command_buffer::update", "::execute", "::initialize"): its count and host
    microseconds per step}. XLA re-records a whole CUDA graph (`update`) whenever an allocation it references moved,
    so about one update per step means some buffer the step touches is new every step."""
    out: dict[str, dict[str, float]] = {}
    for e in _host_events(trace):
        if e["name"].startswith("command_buffer::"):
            entry = out.setdefault(e["name"], {"per_step": 0.0, "us_per_step": 0.0})
            entry["per_step"] += 1 / steps
            entry["us_per_step"] += float(e.get("dur", 0)) / steps
    return out


def device_streams(trace: dict) -> dict[str, list[dict]]:
    """{stream name: its complete events} for every GPU stream in the trace. Device processes are those whose name
    mentions a GPU; within them only threads named like streams carry kernels (others hold per-op or per-module
    summaries of the same time, which would count it twice)."""
    threads, events = _device_threads(trace)
    streams: dict[str, list[dict]] = {}
    for e in events:
        proc_thread = threads.get((e.get("pid"), e.get("tid")))
        if e.get("ph") == "X" and proc_thread is not None and re.search(r"stream", proc_thread[1], re.I):
            streams.setdefault(" ".join(proc_thread), []).append(e)
    return streams


def summarize_trace(trace: dict, steps: int = 1) -> dict[str, Any]:
    """Busy / idle / overlapped microseconds (per step) and per-category kernel time per stream."""
    streams = device_streams(trace)
    out: dict[str, Any] = {"steps": steps, "streams": {}}
    if not streams:
        out["error"] = "no GPU stream events in the trace"
        # What there was, to adjust the match by:
        out["device_threads"] = sorted(" ".join(pt) for pt in _device_threads(trace)[0].values())
        return out
    busy, fills, others = {}, [], []
    for name, evs in streams.items():
        intervals = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in evs]
        busy[name] = _union(intervals)
        cats: dict[str, float] = {}
        for e, iv in zip(evs, intervals):
            cat = category(e["name"])
            cats[cat] = cats.get(cat, 0.0) + float(e.get("dur", 0)) / steps
            (fills if cat == "fill" else others).append(iv)
        out["streams"][name] = {"kernels_per_step": len(evs) / steps, "busy_us_per_step": _length(busy[name]) / steps,
                                "category_us_per_step": dict(sorted(cats.items(), key=lambda kv: -kv[1]))}
    everything = _union([iv for ivs in busy.values() for iv in ivs])
    span = everything[-1][1] - everything[0][0]
    names = sorted(busy)
    overlap = _union([iv for i, a in enumerate(names) for b in names[i + 1:]
                      for iv in _intersection(busy[a], busy[b])])
    # A fill is hidden while other work runs at the same time (only possible from another stream).
    fill_busy = _union(fills)
    out.update(fill_us_per_step=_length(fill_busy) / steps,
               fill_hidden_us_per_step=_length(_intersection(fill_busy, _union(others))) / steps)
    out.update(span_us_per_step=span / steps, busy_us_per_step=_length(everything) / steps,
               idle_us_per_step=(span - _length(everything)) / steps, overlap_us_per_step=_length(overlap) / steps,
               host_during_idle_us_per_step=host_during_idle(trace, everything, steps),
               command_buffer=command_buffer_activity(trace, steps))
    return out


# Beyond this many streams (XLA's CONCURRENT graph order used 247) one lane per stream is unreadable: the lanes are
# then kernel categories over all streams, so overlap shows as bars at the same time in different lanes.
MAX_STREAM_LANES = 16


def plot_timeline(trace: dict, path: str | Path, title: str = "") -> list[str]:
    """One lane per GPU stream (or per kernel category, past MAX_STREAM_LANES streams), kernels coloured by
    category. Returns the lane labels, top to bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = device_streams(trace)
    if not streams:
        return []
    t0 = min(float(e["ts"]) for evs in streams.values() for e in evs)
    names = [c for c, _ in CATEGORIES] + ["other"]
    colours = {cat: f"C{i}" for i, cat in enumerate(names)}
    if len(streams) <= MAX_STREAM_LANES:
        lanes = [(name[-40:], streams[name]) for name in sorted(streams)]
    else:
        every = [e for evs in streams.values() for e in evs]
        lanes = [(cat, evs) for cat in names if (evs := [e for e in every if category(e["name"]) == cat])]
        title = f"{title} ({len(streams)} streams, one lane per kernel category)"
    fig, ax = plt.subplots(figsize=(14, 1.2 + 0.6 * len(lanes)))
    for lane, (_, evs) in enumerate(lanes):
        for cat in colours:
            bars = [((float(e["ts"]) - t0) / 1e3, float(e.get("dur", 0)) / 1e3) for e in evs
                    if category(e["name"]) == cat]
            if bars:
                ax.broken_barh(bars, (lane - 0.4, 0.8), color=colours[cat], label=cat)
    ax.set_yticks(range(len(lanes)), [label for label, _ in lanes], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(title, fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, ncol=len(unique), loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [label for label, _ in lanes]

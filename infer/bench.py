"""`python -m infer.bench`: decode/prefill speed of every engine mode at 8B shapes with random bf16 weights.

A script, not a test. Random weights select meaninglessly, so offload modes replay the selection locality measured
on the real SmolLM2 (`infer.locality`, bench_results/engine/locality_smollm2.json). Writes JSON + PNG under --out.
Runs configurations in priority order and stops when --budget-s is spent (the JSON is rewritten after each one).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import datetime
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import numpy as np  # noqa: E402

SHAPES = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=16),
    # the paper's 8B models: 2 KV heads
    "paper8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=16384, num_layers=32, num_heads=32,
                    num_kv_heads=2, head_dim=128),
    "llama31_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                       num_kv_heads=8, head_dim=128),
}
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def random_model(shape: str, dtype):
    import jax
    from flax import nnx

    from sparda_jax.config import ModelConfig
    from sparda_jax.model import Transformer

    cfg = ModelConfig(max_context=1 << 18, rope_theta=500000.0, **SHAPES[shape])
    # Built on the default device (the GPU) by jax.random: nothing goes through host memory.
    model = Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(model))
    return model


def device_free_bytes() -> int:
    import jax

    st = jax.devices()[0].memory_stats() or {}
    return int(st.get("bytes_limit", 0) - st.get("bytes_in_use", 0))


@dataclasses.dataclass
class Run:
    shape: str
    mode: str
    context: int
    batch: int
    transfer: str = ""
    cache_slots: int = 0
    step_s: float = 0.0  # pipelined (Timing.step_s); in result files without blocking_step_s, the blocking median
    tok_s: float = 0.0
    blocking_step_s: float = 0.0
    dispatch_s: float = 0.0
    hit_rate: float = float("nan")
    misses_per_step: float = 0.0
    mb_per_step: float = 0.0
    copy_s_per_step: float = 0.0  # zero-copy with --profile: fill kernel time (of the profiled steps)
    wait_s_per_step: float = 0.0  # zero-copy with --profile: fill time with no other kernel running beside it
    pcie_gbps: float = float("nan")
    hidden_fraction: float = float("nan")
    # zero-copy: "" (the engine's default fill kernel, compute stream), "grid" / "persistent" (that fill kernel),
    # "stream" (on gpu_stream:1), "nofetch" (fills skipped; timing only), "table" (block->slot table lookup in the
    # slot diff); combinable, e.g. "table+persistent"
    variant: str = ""
    first_call_s: float = 0.0  # compile + first step
    # wall seconds of each part of the run (a GPU session's device time goes mostly here, not into timed steps)
    phase_s: dict = dataclasses.field(default_factory=dict)
    replay: str = ""  # zero-copy selection replay: "trace" (precomputed) or "in-step" (drawn inside the step)
    profile: dict = dataclasses.field(default_factory=dict)  # --profile: infer.trace_summary of traced steps
    # executables of the decode step's jit after the run: 1 expected (3 before the 2026-12-02 fix); 0 = the engine has
    # no single step jit (host-gather) or the run was timed as multi-step programs only
    step_compiles: int = 0
    # executables of the multi-step programs (greedy and sampled) after the run: 1 for a --multistep run, 0 otherwise
    program_compiles: int = 0
    error: str = ""

    def set_timing(self, t: "Timing") -> list:
        self.step_s, self.blocking_step_s, self.dispatch_s, self.first_call_s = (
            t.step_s, t.blocking_step_s, t.dispatch_s, t.first_call_s)
        return t.stats


PROFILE_STEPS = 2


@dataclasses.dataclass
class Timing:
    step_s: float  # pipelined: `steps` steps dispatched back to back, each fed the previous one's greedy token
    blocking_step_s: float  # median of `steps` steps that each wait for their logits (NaN: multi-step timing)
    dispatch_s: float  # median host time to enqueue one pipelined step
    first_call_s: float  # compile + first step
    stats: list  # the blocking steps' StepStats (multi-step timing: the timed steps')


def timed_steps(warmup: int, steps: int) -> int:
    """Decode steps `time_engine` runs (a selection trace must cover them all)."""
    return warmup + 2 * steps + 2


@functools.cache
def greedy():
    """The pipelined loops' next token, on the device: one jitted function for every run (compiled once per batch)."""
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda logits: jnp.argmax(logits, -1).astype(jnp.int32))


def pipelined_steps(engine, token, n: int, multistep: bool, sampled: bool = False):
    """n greedy steps with no host read between them: one `decode(block=False)` each, or (multistep) the
    engine's `decode_greedy` programs (`decode_sampled` at temperature 0.8, top-k 50, top-p 0.95 if sampled).
    Returns the last token (on the device unless multistep)."""
    if multistep and sampled:
        import jax

        from sparda_jax.sampling import SamplingConfig

        # Built on the host: jax.random.split would compile for each new n inside the timed call.
        keys = jax.random.wrap_key_data(np.stack([np.zeros(n), np.arange(n)], 1).astype(np.uint32))
        return engine.decode_sampled(token, keys, SamplingConfig(temperature=0.8, top_k=50, top_p=0.95))[-1]
    if multistep:
        return engine.decode_greedy(token, n)[-1]
    for _ in range(n):
        token = greedy()(engine.decode(token, block=False))
    return token


def time_engine(engine, batch: int, warmup: int, steps: int, multistep: bool = False,
                sampled: bool = False) -> Timing:
    tok = np.ones(batch, np.int32)
    if multistep:
        # Programs only: compiling the single step too cost ~20 s of device time per run. As many steps run before
        # the timed ones as below (a block cache must be as full); the stats are the timed steps' own.
        t0 = time.perf_counter()
        token = pipelined_steps(engine, tok, 1, True, sampled)
        first = time.perf_counter() - t0
        pipelined_steps(engine, token, warmup + steps + 1, True, sampled)
        n1 = len(engine.stats)
        t0 = time.perf_counter()
        pipelined_steps(engine, token, steps, True, sampled)  # returns after its tokens are on the host
        st = engine.stats[n1:]
        return Timing((time.perf_counter() - t0) / steps, float("nan"), float(np.median([s.dispatch_s for s in st])),
                      first, st)
    t0 = time.perf_counter()
    engine.decode(tok)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        engine.decode(tok)
    n0 = len(engine.stats)
    for _ in range(steps):
        engine.decode(tok)
    st = engine.stats[n0:]
    # Two untimed pipelined steps compile `greedy` and any recompile for device tokens.
    token = pipelined_steps(engine, tok, 1, False)
    jax_block(pipelined_steps(engine, token, 1, False))
    n1 = len(engine.stats)
    t0 = time.perf_counter()
    jax_block(pipelined_steps(engine, token, steps, False))
    pipelined = (time.perf_counter() - t0) / steps
    return Timing(pipelined, float(np.median([s.seconds for s in st])),
                  float(np.median([s.dispatch_s for s in engine.stats[n1:]])), first, st)


def jax_block(x):
    return x.block_until_ready() if hasattr(x, "block_until_ready") else x


def profile_engine(engine, batch: int, run: Run, out: Path, multistep: bool = False, sampled: bool = False) -> None:
    """PROFILE_STEPS more steps under the jax profiler (after the timed ones): their summary goes into `run`, the
    timeline into out/profiles/."""
    import tempfile

    import jax

    from infer.trace_summary import find_perfetto_trace, load_trace, plot_timeline, summarize_trace

    tok = np.ones(batch, np.int32)
    token = pipelined_steps(engine, tok, 1, True, sampled) if multistep else greedy()(engine.decode(tok))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            jax_block(pipelined_steps(engine, token, PROFILE_STEPS, multistep, sampled))  # as time_engine's timed loop
        trace = load_trace(find_perfetto_trace(tmp))
    run.profile = summarize_trace(trace, PROFILE_STEPS)
    name = "_".join(str(x) for x in (run.shape, run.context, run.batch, run.mode, run.transfer, run.cache_slots,
                                     run.variant) if x)
    (out / "profiles").mkdir(parents=True, exist_ok=True)
    plot_timeline(trace, out / "profiles" / f"{name}.png", f"{name}: {PROFILE_STEPS} decode steps")


def offload_run(model, sparse, shape, mode, ctx, batch, store, locality, transfer, cache_slots, warmup, steps,
                variant="", replay="trace", profile_out: Path | None = None, cache_warmup: int = 32,
                traces: dict | None = None):
    """One offload decode run. traces: `ReplayTrace`s of this shape and context by (selector statistics, batch),
    shared by the runs that replay the same selections (filled here)."""
    import jax.numpy as jnp

    from infer.engine import OffloadEngine
    from infer.fused import DEFAULT_FILL_PROGRAMS, GRAPH_SCHEDULING, FusedOffloadEngine
    from infer.locality import ReplaySelector, ReplayTrace, device_replay, trace_hook

    c = model.config
    stats_name = "sparse-offload" if mode == "sparse-offload" else "sparda-offload"
    stats = locality["modes"][stats_name]
    r = Run(shape, mode, ctx, batch, transfer, cache_slots, variant=variant)
    words = variant.split("+")  # the variant's '+'-joined words (see --variants)
    if (cache_slots or 0) > sparse.top_k_blocks:  # a block cache reaches its steady state only after many steps
        warmup = max(warmup, cache_warmup)
    kw = dict(mode=mode, batch=batch, max_len=store.num_blocks * 64, cache_slots=cache_slots, store=store)
    clock = time.perf_counter()

    def phase(name):
        nonlocal clock
        now = time.perf_counter()
        r.phase_s[name] = round(now - clock, 2)
        clock = now

    if transfer == "zero-copy":
        r.replay = replay
        replay_args = (stats, c.num_layers, batch, c.num_kv_heads, sparse.top_k_blocks, sparse.local_blocks, ctx)
        if replay == "trace":  # every step time_engine (and profile_engine) runs, drawn before the timing
            traced = PROFILE_STEPS + 1 if profile_out is not None else 0
            traces = {} if traces is None else traces
            if (stats_name, batch) not in traces:
                traces[stats_name, batch] = ReplayTrace(*replay_args)
            trace = traces[stats_name, batch].take(timed_steps(warmup, steps) + traced)
            hook, hstate = trace_hook(jnp.asarray(trace))
        else:
            hook, hstate = device_replay(*replay_args)
        phase("selection replay")
        # "persistent" or "persistentN": the persistent fill kernel with its default or N programs
        persistent = [int(w.removeprefix("persistent") or DEFAULT_FILL_PROGRAMS) for w in words
                      if w.startswith("persistent")]
        eng = FusedOffloadEngine(model, sparse, selection_hook=hook, hook_state=hstate, stream="stream" in words,
                                 fetch="nofetch" not in words,
                                 fill_kernel="persistent" if persistent else "grid" if "grid" in words else "auto",
                                 fill_programs=persistent[0] if persistent else DEFAULT_FILL_PROGRAMS,
                                 keep_fill_inputs="nokeep" not in words,
                                 slot_lookup="table" if "table" in words else "compare",
                                 graph_scheduling=next((g for g in GRAPH_SCHEDULING if g.lower() in words), None), **kw)
    else:
        replay = ReplaySelector(stats, c.num_layers, batch, c.num_kv_heads, sparse.top_k_blocks, sparse.local_blocks)
        eng = OffloadEngine(model, sparse, transfer=transfer, selection_override=replay, gather_threads=12, **kw)
    with eng:
        eng.fill_synthetic(ctx, fill_store=False)
        r.cache_slots = eng.cache_slots
        phase("engine + synthetic fill")
        multistep, sampled = "multistep" in words, "sampled" in words
        st = r.set_timing(time_engine(eng, batch, warmup, steps, multistep, sampled))
        phase("steps (compile included)")
        if profile_out is not None:
            profile_engine(eng, batch, r, profile_out, multistep, sampled)
            phase("profile")
        if hasattr(eng, "_step"):
            r.step_compiles = eng._step._cache_size()
            r.program_compiles = sum(program._cache_size() for program in eng._programs.values())
    phase("close")
    r.tok_s = batch / r.step_s
    hits = sum(s.total("hits") for s in st)
    miss = sum(s.total("misses") for s in st)
    r.hit_rate = hits / max(hits + miss, 1)
    r.misses_per_step = miss / len(st)
    r.mb_per_step = sum(s.total("bytes") for s in st) / len(st) / 1e6
    r.copy_s_per_step = sum(s.total("copy_s") for s in st) / len(st)
    r.wait_s_per_step = sum(s.total("wait_s") for s in st) / len(st)
    if r.copy_s_per_step > 0 and transfer == "host-gather":
        r.pcie_gbps = r.mb_per_step / 1e3 / r.copy_s_per_step
        r.hidden_fraction = max(0.0, 1 - r.wait_s_per_step / r.copy_s_per_step)
    if transfer == "zero-copy" and r.profile.get("fill_us_per_step"):
        traced_mb = sum(s.total("bytes") for s in eng.stats[-PROFILE_STEPS:]) / PROFILE_STEPS / 1e6
        r.copy_s_per_step, r.wait_s_per_step, r.pcie_gbps, r.hidden_fraction = fill_transfer(r.profile, traced_mb)
    del eng
    return r


def fill_transfer(profile: dict, mb_per_step: float) -> tuple[float, float, float, float]:
    """Zero-copy fills are kernels, so their time, and what ran beside them, is known only from a profile
    (`infer.trace_summary`). Returns (copy s, exposed s, GB/s while filling, hidden fraction) per step."""
    fill_s = profile["fill_us_per_step"] / 1e6
    exposed_s = fill_s - profile["fill_hidden_us_per_step"] / 1e6
    return fill_s, exposed_s, mb_per_step / 1e3 / fill_s, 1 - exposed_s / fill_s


def fill_probe(out: dict) -> None:
    """The zero-copy fill kernel alone (pinned_host store -> device pool, in a jit): correctness and GB/s."""
    import jax
    import jax.numpy as jnp

    from infer.host_store import HostKVStore
    from infer.zero_copy import fill_slots, host_arrays

    store = HostKVStore(1, 8, 8, 32768, 64, 128, jnp.bfloat16)  # 1 layer, 32 KiB rows
    store.fill()
    store.data[0, 0, 0, :4] = np.arange(4 * 2 * 64 * 128).reshape(4, 2, 64, 128).astype(store.dtype)
    host = host_arrays(store)[0]
    res = {"store_pinned": store.pinned, "host_memory_kind": str(getattr(host.sharding, "memory_kind", "?"))}
    rng = np.random.default_rng(0)
    p = 1024
    pool_shape = (1, 1, p, 64, 128)
    f = jax.jit(fill_slots, donate_argnums=(3, 4))
    for n in (64, 256, 1024):
        try:
            src = np.full(2 * n, -1, np.int32)  # half the entries masked (-1), as in a real step
            src[::2] = rng.choice(store.flat(0).shape[0], n, replace=False)
            src[0] = 2  # a row written just above: checks that the kernel sees host writes
            dst = np.full(2 * n, -1, np.int32)
            dst[::2] = rng.choice(p, n, replace=False)
            pk, pv = jnp.zeros(pool_shape, jnp.bfloat16), jnp.zeros(pool_shape, jnp.bfloat16)
            pk, pv = f(host, jnp.asarray(src), jnp.asarray(dst), pk, pv)
            got = np.concatenate([np.asarray(pk).reshape(p, -1), np.asarray(pv).reshape(p, -1)], axis=1)
            ok = np.array_equal(got[dst[::2]].view(np.uint16), store.flat(0)[src[::2]].view(np.uint16))
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                pk, pv = f(host, jnp.asarray(src), jnp.asarray(dst), pk, pv)
                pk.block_until_ready()
                ts.append(time.perf_counter() - t0)
            mb = n * store.row_elems * 2 / 1e6
            res[f"fill_{n}rows"] = dict(mb=mb, correct=bool(ok), gbps=mb / 1e3 / float(np.median(ts)))
        except Exception as e:
            res[f"fill_{n}rows"] = {"error": f"{type(e).__name__}: {e}"[:600]}
        log("fill probe", n, res.get(f"fill_{n}rows"))
    out["fill_probe"] = res


def resident_run(model, sparse, shape, mode, ctx, batch, warmup, steps, profile_out: Path | None = None,
                 multistep: bool = False):
    from infer.engine import ResidentEngine

    r = Run(shape, mode, ctx, batch, variant="multistep" if multistep else "")
    eng = ResidentEngine(model, sparse, mode=mode, batch=batch, max_len=ctx + 256)
    eng.fill_synthetic(ctx)
    r.set_timing(time_engine(eng, batch, warmup, steps, multistep))
    if profile_out is not None:
        profile_engine(eng, batch, r, profile_out, multistep)
    r.tok_s = batch / r.step_s
    r.step_compiles = eng._run._cache_size()
    r.program_compiles = eng._greedy._cache_size()
    del eng
    return r


def prefill_run(model, sparse, shape, mode, ctx):
    from infer.engine import make_engine

    r = Run(shape, "prefill:" + mode, ctx, 1)
    kw = {} if mode in ("sparse", "sparda", "dense") else {"prefill_chunk": 4096}
    with make_engine(model, sparse, mode, batch=1, max_len=ctx, **kw) as eng:
        tokens = np.random.default_rng(0).integers(0, 1000, (1, ctx)).astype(np.int32)
        eng.prefill(tokens)  # compile + first run
        eng.prefill(tokens)
        r.step_s = eng.stats[-1].seconds
    r.tok_s = ctx / r.step_s
    return r


def transfer_probe(out: dict) -> None:
    """Raw H2D paths of host-gather: staging device_put (jax pinned_host vs torch pinned via DLPack), threaded
    gather."""
    import jax.numpy as jnp

    from infer.host_store import HostKVStore
    from infer.transfer import HostGatherFetcher

    store = HostKVStore(1, 8, 8, 32768, 64, 128, jnp.bfloat16)  # 1 layer, 4096 rows/seq-head, 32 KiB rows
    store.fill()
    rng = np.random.default_rng(0)
    res = {"store_pinned": store.pinned}
    for n in (128, 512, 2048):
        rows = rng.choice(store.flat(0).shape[0], n, replace=False)
        mb = n * store.row_elems * 2 / 1e6
        for kind in ("jax_pinned", "torch"):
            for threads in (1, 8, 16):
                try:
                    f = HostGatherFetcher(store, n, threads=threads, staging=kind)
                    out_, _ = f.fetch(0, rows)
                    ok = np.array_equal(np.asarray(out_[:n]).view(np.uint16),
                                        store.flat(0)[rows].view(np.uint16))
                    ts = []
                    for _ in range(5):
                        _, rec = f.fetch(0, rows)
                        ts.append((rec.gather_s, rec.copy_s))
                    g, c = np.median(np.array(ts), axis=0)
                    res[f"gather_{kind}_{threads}t_{n}rows"] = dict(mb=mb, correct=bool(ok), gather_gbps=mb / 1e3 / g,
                                                                    total_gbps=mb / 1e3 / c)
                    f.close()
                except Exception as e:
                    res[f"gather_{kind}_{threads}t_{n}rows"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        log("probe", n, {k: v for k, v in res.items() if k.endswith(f"_{n}rows")})
    out["transfer_probe"] = res


def hf_peer(shape: str, ctx: int, steps: int) -> dict:
    """HF transformers' offloaded KV cache at the same shape (random weights), in a subprocess after JAX is gone."""
    code = f"""
import time, json, torch
from transformers import LlamaConfig, LlamaForCausalLM
s = {SHAPES[shape]!r}
cfg = LlamaConfig(vocab_size=s['vocab_size'], hidden_size=s['hidden_size'], intermediate_size=s['intermediate_size'],
    num_hidden_layers=s['num_layers'], num_attention_heads=s['num_heads'], num_key_value_heads=s['num_kv_heads'],
    head_dim=s['head_dim'], max_position_embeddings=262144, torch_dtype=torch.bfloat16)
torch.manual_seed(0)
with torch.device('cuda'):
    m = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
ids = torch.randint(0, 1000, (1, {ctx}), device='cuda')
with torch.no_grad():
    def gen(n):
        torch.cuda.synchronize(); t = time.time()
        m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation='offloaded')
        torch.cuda.synchronize(); return time.time() - t
    gen(2)  # warm-up
    short = gen(1)
    long = gen({steps + 1})
print(json.dumps(dict(shape={shape!r}, context={ctx}, prefill_plus_1_s=short,
                      decode_tok_s={steps} / max(long - short, 1e-9))))
"""
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
        return json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr[-800:]}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _goal_ratios(row, runs, find, shape, ctx, b, k, multi: str, pcie_gbps: float) -> None:
    """`summarize`'s per-batch ratios over the runs timed one way (multi: "" or "multistep"), into row; the keys of
    the multistep runs end in _multistep. Every ratio compares runs timed the same way."""
    key = (lambda name: f"{name}_{multi}") if multi else (lambda name: name)
    sd = find(shape, ctx, b, "sparda-offload", "zero-copy", multi)
    ss = find(shape, ctx, b, "sparse-offload", "zero-copy", multi)
    nf = find(shape, ctx, b, "sparda-offload", "zero-copy", "nofetch")
    # The bound is the fastest resident timing: a multi-step resident program is not always faster (H200,
    # 2026-12-04: its loop ran from the host, 6.22 against 5.92 ms a step pipelined).
    res = min([r for r in (find(shape, ctx, b, "sparda"), find(shape, ctx, b, "sparda", "", multi)) if r],
              key=lambda r: r["step_s"], default=None)
    if sd and ss:
        row[key("sparda_vs_sparse_offload")] = sd["tok_s"] / ss["tok_s"]
    cached = [r for r in runs if (r["shape"], r["context"], r["batch"], r["mode"], r["transfer"]) ==
              (shape, ctx, b, "sparda-offload", "zero-copy") and r["cache_slots"] > k
              and ("multistep" in r["variant"]) == bool(multi)]
    fastest = max(cached, key=lambda r: r["tok_s"]) if cached else None
    if fastest and ss:
        row[key("cache_vs_sparse_offload")] = fastest["tok_s"] / ss["tok_s"]
        row[key("cache_slots")] = fastest["cache_slots"]
    # The same cache for the baseline: its misses fall too, so this is the like-for-like ratio.
    cached_ss = [r for r in runs if (r["shape"], r["context"], r["batch"], r["mode"], r["transfer"],
                                     r["cache_slots"]) == (shape, ctx, b, "sparse-offload", "zero-copy",
                                                           fastest and fastest["cache_slots"])
                 and ("multistep" in r["variant"]) == bool(multi)]
    if cached_ss:
        row[key("cache_vs_cached_sparse_offload")] = fastest["tok_s"] / max(r["tok_s"] for r in cached_ss)
    gpu = res["step_s"] if res else (nf["step_s"] if nf else None)
    for name, run in (("step_vs_bound", sd), ("cache_step_vs_bound", fastest)):
        if gpu and run:
            pcie = run["mb_per_step"] / 1e3 / pcie_gbps
            row[key(name)] = run["step_s"] / max(gpu, pcie)
            if run is sd:
                # where the GPU-only step came from
                row[key("bound_from")] = (("resident sparda " + (res["variant"] or "single steps")) if res
                                          else "nofetch")
                row[key("bound_term")] = "pcie" if pcie > gpu else "gpu step"
                if ss:  # sparda_vs_sparse_offload if sparda-offload ran at its bound: the most the ratio can be
                    row[key("ratio_ceiling")] = ss["step_s"] / max(gpu, pcie)
    if sd and nf and not multi:
        row["exposed_copy_ms"] = (sd["step_s"] - nf["step_s"]) * 1e3


def summarize(result: dict, pcie_gbps: float = 52.0) -> list[dict]:
    """The goal ratios per (shape, context, batch), from the runs of one result JSON.

    sparda_vs_sparse_offload: tok/s ratio of the two offload modes (zero-copy, k slots); ratio_ceiling: the same
    with sparda-offload at its bound (sparse-offload step / bound). step_vs_bound: sparda-offload
    step / max(GPU-only step, missed bytes / pcie_gbps), with the GPU-only step taken from the resident sparda run at
    the same batch when it fits (its faster timing, named in bound_from), else from the `nofetch`
    variant (same program, fills skipped); bound_term says which of the two is larger; cache_step_vs_bound: the
    same for the fastest block-cache run. exposed_copy_ms:
    step - nofetch step. cache_vs_sparse_offload: the fastest sparda-offload run with a block cache (more slots than
    k, any lookup) against sparse-offload, its slots in cache_slots; cache_vs_cached_sparse_offload: the same run
    against sparse-offload with a cache of as many slots. Runs of `--multistep` (variant "multistep",
    or "table+multistep" for the cache) give the same ratios again, keys ending in _multistep.
    """
    runs = [r for r in result["runs"] if not r["error"] and not r["mode"].startswith("prefill")]

    k = result.get("top_k_blocks", 96)  # runs with more cache slots than k are the block-cache variant

    def find(shape, ctx, b, mode, transfer="", variant=""):
        for r in runs:
            if (r["shape"], r["context"], r["batch"], r["mode"], r["variant"]) == (shape, ctx, b, mode, variant) and \
                    (not transfer or r["transfer"] == transfer) and r["cache_slots"] <= k:
                return r
        return None

    out = []
    for shape, ctx in sorted({(r["shape"], r["context"]) for r in runs}):
        for b in sorted({r["batch"] for r in runs if (r["shape"], r["context"]) == (shape, ctx)}):
            row = dict(shape=shape, context=ctx, batch=b)
            for multi in ("", "multistep"):  # per-step dispatch, then multi-step programs (`--multistep`)
                _goal_ratios(row, runs, find, shape, ctx, b, k, multi, pcie_gbps)
            if len(row) > 3:
                out.append(row)
        for multi in ("", "multistep"):
            tops = {m: max((r["tok_s"] for r in runs if (r["shape"], r["context"], r["mode"]) == (shape, ctx, m)
                            and r["variant"] == multi and r["cache_slots"] <= k), default=0.0)
                    for m in ("sparse", "sparda-offload")}
            if all(tops.values()):
                # The largest-batch goal when each mode's largest feasible batch was among the runs.
                out.append(dict(shape=shape, context=ctx, timing=multi or "single steps",
                                best_throughput_ratio=tops["sparda-offload"] / tops["sparse"],
                                sparda_offload_best_tok_s=tops["sparda-offload"],
                                sparse_resident_best_tok_s=tops["sparse"],
                                batches_run=sorted({r["batch"] for r in runs
                                                    if (r["shape"], r["context"]) == (shape, ctx)})))
    return out


def plots(result: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    runs = [r for r in result["runs"] if not r["error"] and not r["mode"].startswith("prefill")]
    for shape in sorted({r["shape"] for r in runs}):
        ctxs = sorted({r["context"] for r in runs if r["shape"] == shape})[:3]
        fig, axes = plt.subplots(1, len(ctxs), figsize=(6 * len(ctxs), 4.5), squeeze=False)
        for ctx, ax in zip(ctxs, axes[0]):
            sel = [r for r in runs if r["shape"] == shape and r["context"] == ctx]
            for key in sorted({(r["mode"], r["transfer"], r["cache_slots"], r["variant"]) for r in sel}):
                pts = sorted((r["batch"], r["tok_s"]) for r in sel
                             if (r["mode"], r["transfer"], r["cache_slots"], r["variant"]) == key)
                label = " ".join(str(x) for x in (key[0], key[1], f"{key[2]} slots" if key[2] else "", key[3]) if x)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
            ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tok/s", title=f"{shape}, {ctx // 1024}K")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"decode_{shape}.png", dpi=110)
        plt.close(fig)


def add_summary(result: dict) -> None:
    result["summary"] = summarize(result)
    for row in result["summary"]:
        log("summary", {key: round(v, 3) if isinstance(v, float) else v for key, v in row.items()})


def merge(paths: list[str], out: Path) -> None:
    parts = [json.loads(Path(x).read_text()) for x in paths]
    if len({(r["device"], r["jax"]) for r in parts}) != 1:
        raise SystemExit("error: the result files come from different devices or jax versions")
    result = {k: v for k, v in parts[0].items() if k not in ("runs", "summary", "command")}
    result["commands"] = [r["command"] for r in parts]
    result["runs"] = [run for r in parts for run in r["runs"] if not run["error"]]
    out.mkdir(parents=True, exist_ok=True)
    plots(result, out)
    add_summary(result)
    (out / "engine_bench_merged.json").write_text(json.dumps(result, indent=1))


def run_plan(a, batches: list[int], b_off: int, b_res: int, num_kv_heads: int, *, dense: bool,
             modes: set[str]) -> list[tuple]:
    """The runs of one (shape, context), from the parsed flags `a`: (kind, mode, batch, transfer, cache slots,
    variant) each; b_off / b_res are the largest offload / resident batches."""
    from infer.engine import OFFLOAD_MODES

    plan = []
    transfers = a.transfers.split(",")
    extra = [int(x) for x in a.extra_batches.split(",")] if a.extra_batches else [1, batches[-1]]
    for b in sorted(set([x for x in batches if x <= b_off] + [b_off])):
        if b <= b_res:
            plan += [("resident", "sparse", b, "", 0, ""), ("resident", "sparda", b, "", 0, "")]
        for tr in transfers:
            plan += [("offload", "sparse-offload", b, tr, 0, ""), ("offload", "sparda-offload", b, tr, 0, "")]
        if b in extra:
            for tr in transfers:
                if a.cache4k and b * num_kv_heads <= a.cache4k_max_rows:
                    # with 4k slots the compare lookup's k x 4k comparisons cost more than the copies
                    # saved (H200, 32K B=8: 700 vs 967 tok/s with the table), so only the table runs
                    plan += [("offload", mode, b, tr, 4 * a.top_k_blocks, "table" if tr == "zero-copy" else "")
                             for mode in OFFLOAD_MODES]
            if "zero-copy" in transfers:
                # a variant naming cache4k runs with the 4k-slot cache, the others with k slots
                plan += [("offload", mode, b, "zero-copy", 4 * a.top_k_blocks if "cache4k" in v.split("+") else 0, v)
                         for mode in a.variant_modes.split(",") for v in a.variants.split(",") if v]
    if a.only_variants:
        plan = [x for x in plan if x[0] == "resident" or (x[5] and x[5] in a.variants.split(","))]
    if a.multistep:
        timed = []
        for kind, mode, b, tr, slots, v in plan:
            if kind == "resident":  # both ways: the summary's bound is the faster (the resident program's
                timed.append((kind, mode, b, tr, slots, v))  # loop ran from the host, H200 2026-12-04)
            if tr in ("zero-copy", "") and v in ("", "table"):  # resident and zero-copy runs
                v = "+".join(filter(None, (v, "multistep")))
            timed.append((kind, mode, b, tr, slots, v))
        plan = timed
    if b_res >= 1 and b_res not in [x[2] for x in plan] and not a.skip_resident_max:
        plan += [("resident", "sparse", b_res, "", 0, ""), ("resident", "sparda", b_res, "", 0, "")]
    if dense:
        plan.append(("resident", "dense", 1, "", 0, ""))
    if a.quick:
        plan = [x for x in plan if x[2] in (1, b_off, b_res) or x[2] == batches[-1]]
    if modes:
        plan = [x for x in plan if x[1] in modes]
    return plan


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.bench", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="paper8b")
    p.add_argument("--contexts", default="32768,65536,131072")
    p.add_argument("--batches", default="1,4,16", help="plus each mode's largest feasible batch")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top-k-blocks", type=int, default=96)
    p.add_argument("--local-blocks", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=0, help="cap on the largest batch tried (0 = none)")
    p.add_argument("--host-gb", type=float, default=60.0, help="host memory for the KV store (pinned: 60 worked on "
                   "the 128 GB H100 host, 90 did not)")
    p.add_argument("--resident-margin-gb", type=float, default=20.0, help="HBM left free next to a resident run's KV")
    p.add_argument("--budget-s", type=float, default=500.0)
    p.add_argument("--locality", default="bench_results/engine/locality_smollm2.json")
    p.add_argument("--profile", action="store_true", help=f"trace {PROFILE_STEPS} more steps of every decode run "
                   "with the jax profiler: per-stream kernel time by category in the JSON, timelines in --out/profiles")
    p.add_argument("--replay", default="trace", choices=("trace", "in-step"),
                   help="zero-copy runs: play a selection trace drawn before timing (default), or draw it inside the "
                        "timed step as the 2026-11-23 runs did")
    p.add_argument("--probe", action="store_true", help="raw transfer-path probe first")
    p.add_argument("--prefill", type=int, default=16384, help="prefill context (0 = skip)")
    p.add_argument("--hf-peer", type=int, default=32768, help="HF offloaded-cache peer context (0 = skip)")
    p.add_argument("--hf-only", action="store_true", help="only the HF peer (run it in its own process: JAX "
                   "holds the GPU memory otherwise)")
    p.add_argument("--modes", default="", help="only these modes' decode runs, comma-separated (default: all; "
                   "device time goes mostly to compiling each offload run)")
    p.add_argument("--dense", action="store_true", help="also dense attention at batch 1, first context")
    p.add_argument("--quick", action="store_true", help="fewer configurations (fits one 10-minute call)")
    p.add_argument("--transfers", default="zero-copy,host-gather")
    p.add_argument("--variants", default="nofetch,stream,persistent,persistent+stream",
                   help="zero-copy variants run at --extra-batches: '+'-joined words of nofetch, stream, grid, "
                   "persistent (or persistentN: N fill programs, default 32; neither: the engine's auto), nokeep "
                   "(keep_fill_inputs=False), table, concurrent or lhs (the CUDA graph order; default LHS for a "
                   "step, CONCURRENT for a multi-step program), multistep, sampled (with multistep), cache4k (the "
                   "4k-slot cache)")
    p.add_argument("--variant-modes", default="sparda-offload", help="offload modes the --variants run in "
                   "(comma-separated)")
    p.add_argument("--only-variants", action="store_true", help="of the offload runs, only the --variants ones")
    p.add_argument("--extra-batches", default="", help="batches that also get the variants / 4k-slot cache "
                   "(default: 1 and the last of --batches)")
    p.add_argument("--multistep", action="store_true",
                   help="time the zero-copy offload runs (k slots and the 4k-slot table) and the resident runs as "
                   "multi-step programs instead (decode_greedy: up to 64 greedy steps per program; variants "
                   "multistep, table+multistep); only the programs compile")
    p.add_argument("--cache4k", action="store_true", help="also both offload modes with a 4k-slot LRU "
                   "cache (the table lookup)")
    p.add_argument("--cache4k-max-rows", type=int, default=64, help="4k-slot cache only where B*KV <= this")
    p.add_argument("--cache-warmup", type=int, default=32, help="warm-up steps of runs with a block cache larger "
                   "than k (an empty cache misses everything at first)")
    p.add_argument("--skip-resident-max", action="store_true", help="no resident run at its largest batch")
    p.add_argument("--fill-probe", action="store_true", help="zero-copy fill kernel probe first")
    p.add_argument("--shape-budgets", default="", help="seconds per shape, comma-separated (default: all to the "
                   "first)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_results/engine"))
    p.add_argument("--merge", nargs="+", metavar="JSON", help="no runs: merge these result files (runs of one device "
                   "split over several calls) into --out/engine_bench_merged.json with its plot and summary")
    return p


def main():
    p = build_parser()
    a = p.parse_args()
    if a.merge:
        merge(a.merge, Path(a.out))
        return
    from infer.engine import ENGINE_MODES

    modes = set(a.modes.split(",")) - {""}
    if unknown := sorted(modes - set(ENGINE_MODES)):
        p.error(f"unknown mode(s) {', '.join(unknown)} (choose from {', '.join(ENGINE_MODES)})")

    import jax
    import jax.numpy as jnp

    from infer.host_store import HostKVStore
    from sparda_jax.config import SparseConfig

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.hf_only:
        peer = hf_peer(a.shapes.split(",")[0], a.hf_peer, 8)
        peer["date"] = datetime.date.today().isoformat()
        (out / f"hf_offloaded_peer_{a.shapes.split(',')[0]}.json").write_text(json.dumps(peer, indent=1))
        log("hf peer", peer)
        return
    dev = jax.devices()[0]
    result = {"date": datetime.date.today().isoformat(), "device": dev.device_kind, "command": " ".join(sys.argv),
              "jax": jax.__version__, "locality_source": a.locality, "top_k_blocks": a.top_k_blocks, "runs": []}
    locality = json.loads(Path(a.locality).read_text())
    sparse = SparseConfig(top_k_blocks=a.top_k_blocks, local_blocks=a.local_blocks)
    path = out / f"engine_bench_{'_'.join(a.shapes.split(','))}.json"

    def save():
        path.write_text(json.dumps(result, indent=1))

    shape_deadline = [T0 + a.budget_s]

    def left():
        return min(a.budget_s - (time.time() - T0), shape_deadline[0] - time.time())

    if a.fill_probe:
        fill_probe(result)
        save()
    if a.probe:
        transfer_probe(result)
        save()
    contexts = [int(x) for x in a.contexts.split(",")]
    batches = [int(x) for x in a.batches.split(",")]
    shape_budgets = [float(x) for x in a.shape_budgets.split(",")] if a.shape_budgets else []
    for si, shape in enumerate(a.shapes.split(",")):
        shape_deadline[0] = (time.time() + shape_budgets[si]) if si < len(shape_budgets) else T0 + a.budget_s
        model = random_model(shape, jnp.bfloat16)
        c = model.config
        weights_free = device_free_bytes()
        log(shape, "model built; device free GB", weights_free / 1e9)
        per_tok = c.num_layers * 2 * c.num_kv_heads * c.head_dim * 2
        for ctx in contexts:
            if left() < 60:  # said, not silent: a budget under ~110 s runs nothing (H200 2026-12-04, call 2)
                log(f"budget: {left():.0f} s left, under the 60 s a context needs; context {ctx} and later skipped")
                break
            max_len = ctx + 256
            seq_host = per_tok * max_len
            b_off = max(1, int(a.host_gb * 1e9 // seq_host))
            if a.max_batch:
                b_off = min(b_off, a.max_batch)
            # resident: KV + compressed keys next to the weights, --resident-margin-gb left for activations, compiles
            # and fragmentation (B=49 with 6 GB and B=43 with 12 GB at 32K hung in the allocator's retry loop, H100)
            b_res = max(0, int((weights_free - a.resident_margin_gb * 1e9) // (seq_host * (1 + 1 / 32))))
            log(f"ctx {ctx}: largest batch resident {b_res}, offload (host {a.host_gb} GB) {b_off}")
            t_alloc = time.time()
            store = HostKVStore(c.num_layers, b_off, c.num_kv_heads, max_len, 64, c.head_dim, jnp.bfloat16,
                                host_memory_gb=a.host_gb)
            store.fill()
            log(f"store {store.nbytes / 1e9:.1f} GB pinned={store.pinned} in {time.time() - t_alloc:.1f}s")
            if not store.pinned and "zero-copy" in a.transfers.split(",") and jax.default_backend() == "gpu":
                # 90 GB could not be pinned on the H100 host (128 GB), 60 GB could; every zero-copy run would fail.
                raise SystemExit(f"error: the {store.nbytes / 1e9:.0f} GB host store could not be pinned, which the "
                                 "zero-copy path needs: lower --host-gb")
            plan = run_plan(a, batches, b_off, b_res, c.num_kv_heads, dense=ctx == contexts[0] and a.dense,
                            modes=modes)
            traces = {}  # the selection traces of this context, shared by its runs
            for kind, mode, b, transfer, slots, variant in plan:
                if left() < 45:
                    log(f"budget: {left():.0f} s left, under the 45 s a run needs; stopping")
                    break
                t_run = time.time()
                try:
                    if kind == "resident":
                        r = resident_run(model, sparse, shape, mode, ctx, b, a.warmup, a.steps,
                                         out if a.profile else None, "multistep" in variant)
                    else:
                        r = offload_run(model, sparse, shape, mode, ctx, b, store, locality, transfer, slots or None,
                                        a.warmup, a.steps, variant, a.replay, out if a.profile else None,
                                        a.cache_warmup, traces)
                except Exception as e:  # OOM and the like: record and go on
                    r = Run(shape, mode, ctx, b, transfer, slots, variant=variant,
                            error=f"{type(e).__name__}: {e}"[:400])
                result["runs"].append(dataclasses.asdict(r))
                gc.collect()
                log(f"{mode:15s} {transfer:11s} {variant:7s} slots {slots:4d} ctx {ctx} B {b:3d}: {r.tok_s:9.1f} tok/s "
                    f"step {r.step_s * 1e3:8.2f} ms (blocking {r.blocking_step_s * 1e3:.2f}, dispatch "
                    f"{r.dispatch_s * 1e3:.2f}) hit {r.hit_rate:.3f} miss/step {r.misses_per_step:7.1f} "
                    f"{r.mb_per_step:7.1f} MB copy {r.copy_s_per_step * 1e3:6.2f} ms "
                    f"wait {r.wait_s_per_step * 1e3:6.2f} ms hidden {r.hidden_fraction:.2f} "
                    f"({time.time() - t_run:.0f}s {r.phase_s or ''}) {r.error[:120]}")
                save()
            del store
            gc.collect()
            try:  # torch caches freed pinned host memory; give it back before the next store is pinned
                import torch

                torch._C._host_emptyCache()
            except Exception:
                pass
        if a.prefill and left() > 90:
            for mode in ("sparse", "sparse-offload", "sparda-offload"):
                try:
                    r = prefill_run(model, sparse, shape, mode, a.prefill)
                except Exception as e:
                    r = Run(shape, "prefill:" + mode, a.prefill, 1, error=f"{type(e).__name__}: {e}"[:400])
                result["runs"].append(dataclasses.asdict(r))
                log(f"prefill {mode} {a.prefill}: {r.step_s:.2f} s {r.error[:100]}")
                save()
        del model
    plots(result, out)
    add_summary(result)
    save()


if __name__ == "__main__":
    main()

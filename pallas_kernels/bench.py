"""GPU benchmark (and on-GPU correctness check) of the block-sparse attention kernels.

    PYTHONPATH=. python -m pallas_kernels.bench                      # check + decode + prefill, results in --out
    PYTHONPATH=. python -m pallas_kernels.bench --modes check,tune   # correctness on GPU and a tuning sweep
    PYTHONPATH=. python -m pallas_kernels.bench --modes decode --quick

A script, not a test: it needs a GPU (it refuses to time on CPU). It prints a table per mode and writes
`bench.json`, `decode.png` and `prefill.png` (and `tune.json` for --modes tune) to --out (default
bench_results/kernels/).

Timing: every measured function is jitted with several calls of the kernel in one program (distinct query arrays, so
XLA cannot merge them; K/V rotated over several input sets when one set would fit in the 50 MB L2), warmed up, then
timed with block_until_ready; the figure is the median over iterations of (wall time / calls). Torch is timed with CUDA
events the same way.

Bytes (decode) = K and V of the listed blocks + q + out (int32 ids/lengths not counted). FLOPs (prefill) =
4 * 64 * 64 * D per (query head, query block, listed KV block) pair, the diagonal block counted in full; the dense
baselines are counted with the same formula over all causal block pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import statistics
import sys
import time

import numpy as np

HBM_PEAK = 3.35e12  # H100 SXM datasheet figure, bytes/s
BLOCK = 64
# Smoke-test switch (CPU): run every kernel, ours and jax's, in interpret mode. Timings are then meaningless.
INTERPRET = os.environ.get("SPARDA_BENCH_INTERPRET") == "1"
IMPL = "pallas_interpret" if INTERPRET else "pallas"


# ----------------------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------------------
def _time_jax(fn, arg_list, *, iters=7, warmup=2):
    """Median seconds per call of fn over the argument tuples in arg_list (all run inside one jitted program)."""
    import jax

    multi = jax.jit(lambda all_args: [fn(*a) for a in all_args])
    out = multi(arg_list)
    jax.block_until_ready(out)
    for _ in range(warmup - 1):
        jax.block_until_ready(multi(arg_list))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(multi(arg_list))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(arg_list), out[0]


def _time_torch(fn, arg_list, *, iters=7, warmup=2):
    import torch

    for _ in range(warmup):
        for a in arg_list:
            fn(*a)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for a in arg_list:
            fn(*a)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times) / len(arg_list)


def _rel_err(out, ref):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return float("nan")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def _try_import_torch():
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return torch
    except Exception:  # torch absent or broken: torch baselines are skipped
        return None


def _gpu_free_bytes():
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
        return stats["bytes_limit"] - stats["bytes_in_use"]
    except Exception:
        return 70e9


# ----------------------------------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DecodeCase:
    batch: int
    context: int
    kv_heads: int
    q_heads: int = 32
    head_dim: int = 128

    @property
    def group(self):
        return self.q_heads // self.kv_heads

    @property
    def blocks(self):
        return self.context // BLOCK

    @property
    def kv_bytes(self):  # K + V of the listed blocks, bf16
        return 2 * self.batch * self.kv_heads * self.context * self.head_dim * 2

    @property
    def bytes(self):  # + q + out
        return self.kv_bytes + 2 * self.batch * self.q_heads * self.head_dim * 2


def _decode_inputs(case: DecodeCase, n_sets: int, n_calls: int, seed=0):
    """K/V as [B, KV, T, D] (a free reshape to the [B, KV, P, S, D] pool inside jit), ids = a random permutation of all
    P = T / 64 blocks per (b, h), every block full."""
    import jax
    import jax.numpy as jnp

    b, h, t, d = case.batch, case.kv_heads, case.context, case.head_dim
    sets = []
    for s in range(n_sets):
        kk, kv, ki = jax.random.split(jax.random.key(seed * 1000 + s), 3)
        k = jax.random.normal(kk, (b, h, t, d), jnp.bfloat16)
        v = jax.random.normal(kv, (b, h, t, d), jnp.bfloat16)
        ids = jnp.argsort(jax.random.uniform(ki, (b, h, case.blocks)), axis=-1).astype(jnp.int32)
        sets.append((k, v, ids))
    lens = jnp.full((b, h, case.blocks), BLOCK, jnp.int32)
    qs = [
        jax.random.normal(jax.random.key(seed * 1000 + 500 + i), (b, h, case.group, d), jnp.bfloat16)
        for i in range(n_calls)
    ]
    jax.block_until_ready((sets, qs))
    return sets, lens, qs


def _sets_and_calls(nbytes):
    n_sets = int(min(16, max(1, math.ceil(320e6 / nbytes))))
    n_calls = int(min(64, max(2, n_sets, math.ceil(1e9 / nbytes))))
    return n_sets, n_calls


def _decode_ours(cfg):
    from pallas_kernels.sparse_decode import sparse_decode_attention

    def fn(q, k, v, ids, lens):
        b, h, t, d = k.shape
        kp = k.reshape(b, h, t // BLOCK, BLOCK, d)
        vp = v.reshape(b, h, t // BLOCK, BLOCK, d)
        return sparse_decode_attention(q, kp, vp, ids, lens, implementation=IMPL, **cfg)

    return fn


def _decode_reference(q, k, v, ids, lens):
    from pallas_kernels.sparse_decode import sparse_decode_attention_reference

    b, h, t, d = k.shape
    return sparse_decode_attention_reference(
        q, k.reshape(b, h, t // BLOCK, BLOCK, d), v.reshape(b, h, t // BLOCK, BLOCK, d), ids, lens
    )


def _decode_stock_gqa(q, k, v, ids, lens):
    """jax's stock ops/gpu/decode_attention.gqa, dense over the same number of tokens (defaults: block_h 16,
    block_k 128, k_splits 16)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import decode_attention

    del ids, lens
    b, h, g, d = q.shape
    return decode_attention.gqa(q.reshape(b, h * g, d), k.swapaxes(1, 2), v.swapaxes(1, 2), interpret=INTERPRET)


_REF_CACHE = {}


def run_decode_case(case: DecodeCase, impls, cfg=None, torch=None, iters=7, check=True):
    """Times the requested implementations at one shape; returns a list of result dicts.

    With `check`, every implementation's output for the first argument set is compared with the jnp reference
    (float32 math, output in bf16) where the reference's temporaries fit: `rel_err` = ||out - ref|| / ||ref||. (The
    stock dense kernel attends to the same tokens in another order; softmax does not care.)
    """
    import jax

    cfg = cfg or {}
    rows = []
    n_sets, n_calls = _sets_and_calls(case.kv_bytes)
    need = n_sets * case.kv_bytes
    if need > 0.8 * _gpu_free_bytes():
        return [dict(impl=i, **dataclasses.asdict(case), skipped="does not fit in GPU memory") for i in impls]
    try:
        sets, lens, qs = _decode_inputs(case, n_sets, n_calls)
    except Exception as e:  # e.g. out of memory while generating
        return [
            dict(impl=i, **dataclasses.asdict(case), skipped=f"inputs: {type(e).__name__}: {str(e)[:200]}")
            for i in impls
        ]
    args = [(qs[i],) + sets[i % n_sets][:2] + (sets[i % n_sets][2], lens) for i in range(n_calls)]
    # the reference gathers K and V and upcasts V to float32: about 3x one set in temporaries
    ref_fits = 3 * case.kv_bytes + need < 0.8 * _gpu_free_bytes()
    ref = None
    key = dataclasses.astuple(case)
    if check and ref_fits:
        try:
            if key not in _REF_CACHE:  # inputs are generated from fixed seeds, so the reference output can be reused
                _REF_CACHE[key] = np.asarray(jax.jit(_decode_reference)(*args[0]), np.float32)
            ref = _REF_CACHE[key]
        except Exception:  # out of memory after all: no error column
            ref = None
    shape4 = (case.batch, case.kv_heads, case.group, case.head_dim)
    for impl in impls:
        row = dict(impl=impl, **dataclasses.asdict(case), bytes=case.bytes, calls=n_calls, sets=n_sets)
        out = None
        try:
            if impl == "ours":
                secs, out = _time_jax(_decode_ours(cfg), args, iters=iters)
                row["config"] = {k: v for k, v in cfg.items()}
            elif impl == "stock_gqa":
                secs, out = _time_jax(_decode_stock_gqa, args, iters=iters)
            elif impl == "reference":
                if not ref_fits:
                    row["skipped"] = "reference temporaries do not fit"
                    rows.append(row)
                    continue
                secs, out = _time_jax(_decode_reference, args[: max(2, min(n_calls, 8))], iters=max(3, iters // 2))
            elif impl == "torch_sdpa":
                if torch is None:
                    row["skipped"] = "torch not available"
                    rows.append(row)
                    continue
                secs, out = _time_torch_sdpa_decode(torch, case, args, iters)
            else:
                raise ValueError(impl)
            row.update(us=secs * 1e6, gbps=case.bytes / secs / 1e9, pct_peak=100 * case.bytes / secs / HBM_PEAK)
            if ref is not None and out is not None:
                row["rel_err"] = _rel_err(np.asarray(out, np.float32).reshape(shape4), ref)
        except Exception as e:  # keep the run going; the table says what failed
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
    del sets, qs, args
    return rows


def _time_torch_sdpa_decode(torch, case, args, iters):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    targs = []
    for q, k, v, _, _ in args:
        tq = torch.from_dlpack(q).reshape(case.batch, case.q_heads, 1, case.head_dim)
        targs.append((tq, torch.from_dlpack(k), torch.from_dlpack(v)))

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        secs = _time_torch(fn, targs, iters=iters)
        out = fn(*targs[0]).float().cpu().numpy()
    return secs, out


# ----------------------------------------------------------------------------------------------------------------------
# prefill
# ----------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PrefillCase:
    seq: int
    fraction: float
    batch: int = 1
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128


def _prefill_block_lists(case: PrefillCase, seed=0):
    """[B, KV, nQB, N] int32 lists: of the causal blocks 0..i of query block i keep round(fraction * (i + 1)) (at least
    block 0 and the diagonal block i), chosen at random per (b, h, i); -1 padding. Returns (ids, listed pairs per
    (b, h))."""
    rng = np.random.default_rng(seed)
    n = case.seq // BLOCK
    i = np.arange(n)
    keep = np.maximum(np.minimum(2, i + 1), np.round(case.fraction * (i + 1)).astype(np.int64))
    width = int(keep.max())
    keys = rng.random((case.batch, case.kv_heads, n, n))
    keys[..., i[:, None] < i[None, :]] = np.inf  # future blocks never
    keys[..., 0] = -2.0  # sink block
    keys[..., i, i] = -1.0  # diagonal
    order = np.argsort(keys, axis=-1)[..., :width].astype(np.int32)
    ids = np.where(np.arange(width)[None, :] < keep[:, None], order, -1).astype(np.int32)
    return ids, int(keep.sum())


def _prefill_flops(case: PrefillCase, pairs_per_head_group: int):
    return 4.0 * BLOCK * BLOCK * case.head_dim * case.q_heads * case.batch * pairs_per_head_group


def run_prefill_case(case: PrefillCase, impls, cfg=None, torch=None, iters=5):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.sparse_prefill import sparse_prefill_attention

    cfg = cfg or {}
    b, h, t, d = case.batch, case.kv_heads, case.seq, case.head_dim
    g = case.q_heads // h
    key = jax.random.key(7)
    kq, kk, kv = jax.random.split(key, 3)
    n_calls = 3
    qs = [jax.random.normal(jax.random.fold_in(kq, i), (b, h, g, t, d), jnp.bfloat16) for i in range(n_calls)]
    k = jax.random.normal(kk, (b, h, t, d), jnp.bfloat16)
    v = jax.random.normal(kv, (b, h, t, d), jnp.bfloat16)
    ids_np, pairs = _prefill_block_lists(case)
    ids = jnp.asarray(ids_np)
    kv_len = jnp.full((b,), t, jnp.int32)
    n = t // BLOCK
    dense_pairs = n * (n + 1) // 2
    rows = []
    for impl in impls:
        row = dict(impl=impl, **dataclasses.asdict(case), listed_pairs_per_head=pairs)
        try:
            if impl == "ours":
                fn = functools.partial(sparse_prefill_attention, implementation=IMPL, **cfg)
                secs, _ = _time_jax(
                    lambda q, k, v, ids, kl: fn(q, k, v, ids, kl), [(q, k, v, ids, kv_len) for q in qs], iters=iters
                )
                flops = _prefill_flops(case, pairs)
                row["config"] = dict(cfg)
            elif impl == "stock_mha":
                if case.fraction != 1.0:
                    continue
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    from jax.experimental.pallas.ops.gpu import attention

                # mha is multi-head only: K/V repeated to all query heads (outside the timing), layout [B, T, H, D].
                kr = jnp.repeat(k, g, axis=1).swapaxes(1, 2)
                vr = jnp.repeat(v, g, axis=1).swapaxes(1, 2)
                mq = [q.reshape(b, h * g, t, d).swapaxes(1, 2) for q in qs]
                jax.block_until_ready((kr, vr, mq))
                fn = functools.partial(
                    attention.mha, segment_ids=None, sm_scale=1 / math.sqrt(d), causal=True, interpret=INTERPRET
                )
                secs, _ = _time_jax(lambda q, k, v: fn(q, k, v), [(q, kr, vr) for q in mq], iters=iters)
                flops = _prefill_flops(case, dense_pairs)
                del kr, vr, mq
            elif impl == "torch_sdpa":
                if case.fraction != 1.0:
                    continue
                if torch is None:
                    row["skipped"] = "torch not available"
                    rows.append(row)
                    continue
                import torch.nn.functional as F

                tk_, tv_ = torch.from_dlpack(k), torch.from_dlpack(v)
                targs = [(torch.from_dlpack(q).reshape(b, h * g, t, d), tk_, tv_) for q in qs]
                secs = _time_torch(
                    lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                    targs,
                    iters=iters,
                )
                flops = _prefill_flops(case, dense_pairs)
            else:
                raise ValueError(impl)
            row.update(ms=secs * 1e3, tflops=flops / secs / 1e12)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
    del qs, k, v
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# correctness on the GPU
# ----------------------------------------------------------------------------------------------------------------------
def run_check(lite=False):
    """Kernel vs the float32 reference on upcast inputs, on the GPU, for bf16 and f32, ragged pools, -1 entries, 0
    lengths and NaN-poisoned unused pool rows. Returns rows with relative errors."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.sparse_decode import sparse_decode_attention, sparse_decode_attention_reference
    from pallas_kernels.sparse_prefill import sparse_prefill_attention, sparse_prefill_attention_reference

    rows = []
    rng = np.random.default_rng(0)
    decode_cases = [
        # B, KV, G, D, P, S, N, dtype
        (2, 2, 4, 128, 40, 64, 33, "bfloat16"),
        (2, 2, 4, 128, 40, 64, 57, "float32"),
        (3, 3, 3, 64, 17, 64, 9, "bfloat16"),
        (1, 2, 16, 128, 300, 64, 256, "bfloat16"),
        (2, 1, 1, 64, 8, 64, 12, "float32"),
        (2, 8, 4, 128, 256, 64, 256, "bfloat16"),
    ]
    if lite:
        decode_cases = decode_cases[:2]
    for b, h, g, d, p, s, n, dt in decode_cases:
        dtype = jnp.dtype(dt)
        q = rng.standard_normal((b, h, g, d))
        k = rng.standard_normal((b, h, p, s, d))
        v = rng.standard_normal((b, h, p, s, d))
        ids = np.stack(
            [
                np.stack([np.concatenate([rng.permutation(p), np.full(max(0, n - p), -1)])[:n] for _ in range(h)])
                for _ in range(b)
            ]
        )
        for idx in np.ndindex(b, h):
            rng.shuffle(ids[idx])
        ids[rng.random(ids.shape) < 0.1] = -1
        lens = rng.integers(0, s + 1, ids.shape)
        lens[rng.random(ids.shape) < 0.6] = s
        ids[0, 0, :] = -1  # one row with nothing valid -> zeros
        # poison every pool row that no list makes valid
        valid = np.zeros((b, h, p, s), bool)
        for bi, hi, j in np.ndindex(b, h, n):
            if ids[bi, hi, j] >= 0:
                valid[bi, hi, ids[bi, hi, j], : lens[bi, hi, j]] = True
        k[~valid] = np.nan
        v[~valid] = np.nan
        args = [jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(ids, jnp.int32), jnp.asarray(lens, jnp.int32)]
        out = sparse_decode_attention(*args, implementation=IMPL)
        ref = sparse_decode_attention_reference(*[a.astype(jnp.float32) for a in args[:3]], *args[3:])
        err = _rel_err(out, ref)
        zero_row_ok = bool(np.all(np.asarray(out, np.float32)[0, 0] == 0))
        rows.append(
            dict(
                kernel="decode",
                shape=f"B{b} KV{h} G{g} D{d} P{p} S{s} N{n}",
                dtype=dt,
                rel_err=err,
                empty_row_zero=zero_row_ok,
                finite=bool(np.all(np.isfinite(np.asarray(out, np.float32)))),
            )
        )

    prefill_cases = [
        # B, KV, G, D, Tq, Tk, q_start, N, dtype, kv_len
        (1, 2, 4, 128, 512, 1024, 512, 6, "bfloat16", (1000,)),
        (2, 2, 4, 128, 256, 512, 256, 12, "float32", (512, 300)),
        (1, 3, 3, 64, 384, 384, 0, 4, "bfloat16", (384,)),
        (1, 1, 16, 128, 256, 256, 0, 8, "bfloat16", (256,)),
    ]
    if lite:
        prefill_cases = prefill_cases[:3]
    for b, h, g, d, tq, tk, q0, n, dt, kvl in prefill_cases:
        dtype = jnp.dtype(dt)
        nqb, nkb = tq // BLOCK, tk // BLOCK
        ids = np.full((b, h, nqb, n), -1, np.int32)
        for bi, hi, i in np.ndindex(b, h, nqb):
            last = (q0 // BLOCK) + i
            cand = rng.permutation(min(nkb, last + 1))[: rng.integers(1, n + 1)]
            ids[bi, hi, i, : len(cand)] = cand
            rng.shuffle(ids[bi, hi, i])
        q = jnp.asarray(rng.standard_normal((b, h, g, tq, d)), dtype)
        k = jnp.asarray(rng.standard_normal((b, h, tk, d)), dtype)
        v = jnp.asarray(rng.standard_normal((b, h, tk, d)), dtype)
        kv_len = jnp.asarray(kvl, jnp.int32)
        ref = sparse_prefill_attention_reference(
            q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), jnp.asarray(ids), kv_len, q_start=q0
        )
        cfgs = [{}]
        if g % 2 == 0:  # the other code paths too
            cfgs.append(dict(heads_per_program=1, id_source="preload", num_warps=4))
        for cfg in cfgs:
            out = sparse_prefill_attention(q, k, v, jnp.asarray(ids), kv_len, q_start=q0, implementation=IMPL, **cfg)
            rows.append(
                dict(
                    kernel="prefill",
                    shape=f"B{b} KV{h} G{g} D{d} Tq{tq} Tk{tk} q0={q0} N{n}",
                    dtype=dt,
                    config=cfg,
                    rel_err=_rel_err(out, ref),
                    finite=bool(np.all(np.isfinite(np.asarray(out, np.float32)))),
                )
            )
    jax.clear_caches()
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# tuning sweep
# ----------------------------------------------------------------------------------------------------------------------
TUNE_DECODE_CASES = [DecodeCase(8, 32768, 8), DecodeCase(1, 131072, 2)]
TUNE_PREFILL_CASE = PrefillCase(16384, 0.5)


def _geomean(xs):
    return float(np.exp(np.mean(np.log(xs)))) if xs else 0.0


def run_tune(quick=False, rows=None, save=lambda: None):
    """Sweeps the kernel knobs on a few shapes and returns (best decode config, best prefill config).

    Decode: the configuration with the highest geometric-mean GB/s over the tuning shapes (only configurations whose
    output matched the reference, rel_err < 2e-2, count). Prefill: the highest TFLOP/s at T=16K, half the blocks kept.
    """
    rows = [] if rows is None else rows
    dcases = TUNE_DECODE_CASES
    configs = []
    for nb in (1, 2):
        for st in (2, 3, 4):  # Triton's software pipeliner, ids preloaded
            configs.append(dict(id_source="preload", blocks_per_tile=nb, num_warps=4, num_stages=st))
        for st in (2, 3):  # ids loaded one step ahead
            configs.append(dict(id_source="prefetch", blocks_per_tile=nb, num_warps=4, num_stages=st))
        # register double buffering of the K/V tiles, no pipeliner
        configs.append(dict(id_source="preload", blocks_per_tile=nb, num_warps=4, num_stages=1, kv_prefetch=True))
    if quick:
        configs = configs[::3]

    def score(cfg):
        got = []
        for case in dcases:
            m = [
                r
                for r in rows
                if r.get("config") == cfg
                and "gbps" in r
                and r.get("rel_err", 0) < 2e-2
                and (r["batch"], r["context"], r["kv_heads"]) == (case.batch, case.context, case.kv_heads)
            ]
            if not m:
                return 0.0
            got.append(m[0]["gbps"])
        return _geomean(got)

    def sweep(cfgs, cases, run_case, show, iters):
        for cfg in cfgs:
            for case in cases:
                r = run_case(case, ["ours"], cfg=cfg, iters=iters)
                rows.extend(r)
                show(r, header=False)
                sys.stdout.flush()
            save()

    sweep(configs, dcases, run_decode_case, _print_decode, 5)
    best = max(configs, key=score)
    more = [dict(best, max_tiles_per_split=t) for t in (16, 64)] + [dict(best, num_warps=8)]
    sweep(more, dcases, run_decode_case, _print_decode, 5)
    best_decode = max(configs + more, key=score)

    pcase = TUNE_PREFILL_CASE
    pconfigs = []
    for gh, w, st in ((1, 4, 2), (1, 4, 3), (2, 4, 2), (2, 4, 3), (2, 8, 3)):
        pconfigs.append(dict(heads_per_program=gh, blocks_per_tile=1, num_warps=w, num_stages=st, id_source="prefetch"))
    if quick:
        pconfigs = pconfigs[::2]

    def pscore(cfg):
        m = [r["tflops"] for r in rows if r.get("config") == cfg and "tflops" in r]
        return m[0] if m else 0.0

    sweep(pconfigs, [pcase], run_prefill_case, _print_prefill, 3)
    pbest = max(pconfigs, key=pscore)
    pmore = [dict(pbest, id_source="preload"), dict(pbest, blocks_per_tile=2)]
    sweep(pmore, [pcase], run_prefill_case, _print_prefill, 3)
    best_prefill = max(pconfigs + pmore, key=pscore)

    print("\n== tuning: best per shape ==")
    for case in dcases:
        m = [
            r
            for r in rows
            if "gbps" in r and (r["batch"], r["context"], r["kv_heads"]) == (case.batch, case.context, case.kv_heads)
        ]
        _print_decode(sorted(m, key=lambda r: -r["gbps"])[:3], header=False)
    _print_prefill(sorted([r for r in rows if "tflops" in r], key=lambda r: -r["tflops"])[:3], header=False)
    print("chosen decode config:", json.dumps(best_decode), f"(geomean {score(best_decode):.0f} GB/s)")
    print("chosen prefill config:", json.dumps(best_prefill), f"({pscore(best_prefill):.1f} TFLOP/s)")
    return best_decode, best_prefill


# ----------------------------------------------------------------------------------------------------------------------
# printing and plotting
# ----------------------------------------------------------------------------------------------------------------------
def _print_decode(rows, header=True):
    if header:
        print(
            f"{'impl':<11} {'B':>3} {'ctx':>7} {'KV':>3} {'G':>3} {'us':>9} {'MB read':>9} {'GB/s':>7} {'%peak':>6} "
            f"{'rel_err':>8}  note"
        )
    for r in rows:
        note = r.get("skipped") or r.get("error") or (json.dumps(r["config"]) if r.get("config") else "")
        where = f"{r['impl']:<11} {r['batch']:>3} {r['context']:>7} {r['kv_heads']:>3}"
        if "us" in r:
            print(
                f"{where} {r['q_heads'] // r['kv_heads']:>3} "
                f"{r['us']:>9.1f} {r['bytes'] / 1e6:>9.1f} {r['gbps']:>7.0f} {r['pct_peak']:>5.1f}% "
                f"{(format(r['rel_err'], '.1e') if 'rel_err' in r else '-'):>8}  {note}"
            )
        else:
            print(
                f"{where} {'':>3} {'-':>9} {'':>9} {'':>7} "
                f"{'':>6}  {note}"
            )


def _print_prefill(rows, header=True):
    if header:
        print(f"{'impl':<11} {'T':>6} {'kept':>5} {'ms':>9} {'TFLOP/s':>8}  note")
    for r in rows:
        note = r.get("skipped") or r.get("error") or (json.dumps(r["config"]) if r.get("config") else "")
        if "ms" in r:
            print(f"{r['impl']:<11} {r['seq']:>6} {r['fraction']:>5.2f} {r['ms']:>9.3f} {r['tflops']:>8.1f}  {note}")
        else:
            print(f"{r['impl']:<11} {r['seq']:>6} {r['fraction']:>5.2f} {'-':>9} {'':>8}  {note}")


def _plot(results, out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # plotting is optional
        print("no plot:", e)
        return
    dec = [r for r in results.get("decode", []) if "gbps" in r]
    if dec:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
        for ax, kvh in zip(axes, (8, 2)):
            shapes = sorted(
                {(r["batch"], r["context"]) for r in dec if r["kv_heads"] == kvh}, key=lambda s: (s[1], s[0])
            )
            labels = [f"B{b}\n{c // 1024}K" for b, c in shapes]
            impls = [i for i in ("ours", "stock_gqa", "torch_sdpa", "reference") if any(r["impl"] == i for r in dec)]
            w = 0.8 / max(1, len(impls))
            for j, impl in enumerate(impls):
                vals = []
                for s in shapes:
                    m = [
                        r["gbps"]
                        for r in dec
                        if r["impl"] == impl and r["kv_heads"] == kvh and (r["batch"], r["context"]) == s
                    ]
                    vals.append(m[0] if m else 0)
                ax.bar(np.arange(len(shapes)) + j * w, vals, w, label=impl)
            ax.axhline(HBM_PEAK / 1e9, color="k", ls="--", lw=0.8)
            ax.axhline(0.8 * HBM_PEAK / 1e9, color="r", ls=":", lw=0.8)
            ax.set_xticks(np.arange(len(shapes)) + 0.4 - w / 2)
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_title(f"decode, 32 q heads, {kvh} KV heads, D=128, bf16")
            ax.set_ylabel("GB/s (K+V+q+out)")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "decode.png"), dpi=120)
    pre = [r for r in results.get("prefill", []) if "tflops" in r]
    if pre:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for t in sorted({r["seq"] for r in pre}):
            ours = sorted([r for r in pre if r["impl"] == "ours" and r["seq"] == t], key=lambda r: r["fraction"])
            ax.plot([r["fraction"] for r in ours], [r["ms"] for r in ours], "o-", label=f"ours T={t // 1024}K")
            for impl, mk in (("stock_mha", "s"), ("torch_sdpa", "^")):
                m = [r for r in pre if r["impl"] == impl and r["seq"] == t]
                if m:
                    ax.plot([1.0], [m[0]["ms"]], mk, label=f"{impl} (dense) T={t // 1024}K")
        ax.set_xlabel("kept fraction of causal blocks")
        ax.set_ylabel("ms")
        ax.set_title("prefill, B=1, 32 q heads, 8 KV heads, D=128, bf16")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "prefill.png"), dpi=120)


# ----------------------------------------------------------------------------------------------------------------------
def _config_value(jax, name):
    try:
        return jax.config.read(name)
    except Exception:
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_results/kernels/")
    ap.add_argument("--modes", default="check,decode,prefill", help="comma list of check, tune, decode, prefill")
    ap.add_argument("--quick", action="store_true", help="a few decode/prefill shapes only")
    ap.add_argument("--quick-tune", action="store_true", help="a third of the tuning configurations")
    ap.add_argument("--use-tuned", action="store_true", help="run decode/prefill with the configs the tune mode chose")
    ap.add_argument("--lite-check", action="store_true", help="a few correctness cases only")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--decode-config", default="{}", help="JSON kwargs for sparse_decode_attention")
    ap.add_argument("--prefill-config", default="{}", help="JSON kwargs for sparse_prefill_attention")
    args = ap.parse_args(argv)

    import jax

    if jax.default_backend() != "gpu" and not INTERPRET:
        print("pallas_kernels.bench needs a GPU (jax.default_backend() is", jax.default_backend() + ")")
        return 2
    os.makedirs(args.out, exist_ok=True)
    dev = jax.devices()[0]
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=getattr(dev, "device_kind", str(dev)),
        sm_count=getattr(dev, "core_count", None),
        jax=jax.__version__,
        command="python -m pallas_kernels.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        use_mosaic_gpu_flag=_config_value(jax, "jax_pallas_use_mosaic_gpu"),
    )
    torch = None if args.no_torch else _try_import_torch()
    meta["torch"] = getattr(torch, "__version__", None)
    print(json.dumps(meta))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    dcfg = json.loads(args.decode_config)
    pcfg = json.loads(args.prefill_config)
    results = dict(meta=meta, decode_config=dcfg, prefill_config=pcfg)
    path = os.path.join(args.out, "bench.json")

    def save():
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    if "check" in modes:
        t0 = time.time()
        rows = run_check(lite=args.lite_check)
        results["check"] = rows
        print("\n== correctness on GPU (relative L2 error vs float32 reference) ==")
        for r in rows:
            print(json.dumps(r))
        print(f"(check took {time.time() - t0:.1f}s)")
        save()
    if "tune" in modes:
        t0 = time.time()
        print("\n== tuning sweep ==")
        results["tune"] = []
        best_d, best_p = run_tune(args.quick_tune, results["tune"], save)
        results["tuned_decode_config"], results["tuned_prefill_config"] = best_d, best_p
        if args.use_tuned:  # explicit --*-config keys win
            dcfg = dict(best_d, **dcfg)
            pcfg = dict(best_p, **pcfg)
            results["decode_config"], results["prefill_config"] = dcfg, pcfg
        print(f"(tune took {time.time() - t0:.1f}s)")
        save()
    if "prefill" in modes:
        t0 = time.time()
        rows = []
        print("\n== prefill ==")
        _print_prefill([], header=True)
        seqs = (16384, 32768) if not args.quick else (16384,)
        for t in seqs:
            for frac in (1.0, 0.5, 0.25, 0.1):
                r = run_prefill_case(PrefillCase(t, frac), ["ours", "stock_mha", "torch_sdpa"], cfg=pcfg, torch=torch)
                _print_prefill(r, header=False)
                sys.stdout.flush()
                rows += r
                results["prefill"] = rows
                save()
        print(f"(prefill took {time.time() - t0:.1f}s)")
    if "decode" in modes:
        t0 = time.time()
        batches, contexts = (1, 4, 16, 64), (8192, 32768, 131072)
        if args.quick:
            batches, contexts = (1, 8, 64), (32768,)
        rows = []
        print("\n== decode ==")
        _print_decode([], header=True)
        for kvh in (8, 2):
            for ctx in contexts:
                for b in batches:
                    r = run_decode_case(
                        DecodeCase(b, ctx, kvh),
                        ["ours", "stock_gqa", "torch_sdpa", "reference"],
                        cfg=dcfg,
                        torch=torch,
                        iters=5,
                    )
                    _print_decode(r, header=False)
                    sys.stdout.flush()
                    rows += r
                    results["decode"] = rows
                    save()
        print(f"(decode took {time.time() - t0:.1f}s)")
    save()
    _plot(results, args.out)
    if "decode" in results:
        print("\n== decode summary ==")
        _print_decode(results["decode"])
    if "prefill" in results:
        print("\n== prefill summary ==")
        _print_prefill(results["prefill"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

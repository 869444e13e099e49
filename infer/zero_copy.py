"""Zero-copy fill of the device slot pool from the pinned host KV store (a Pallas/Triton kernel).

The host store's layers are exposed to JAX as `pinned_host` arrays [rows, 2*S*D] (one row = K then V of one block of
one (sequence, KV head)), created from the pinned torch tensor through DLPack with every view, dtype change and
reshape done in torch first: a JAX op (even a reshape) on a `pinned_host` array compiles as a host computation and
fails with XLA E1200 (CompileTimeHostOffloadOutputLocationMismatch). JAX only passes the array into the kernel.

`fill_slots` copies row src[i] of the host array into pool slot dst[i] (K into the K pool, V into the V pool), in
place (the pools are aliased to the outputs). Entries with src[i] < 0 are masked in the load and the store, so only
missed blocks cross PCIe. One program per (entry, piece of the row): the grid covers every selected block, hit or
miss, and fills the whole GPU.

`fill_slots_persistent` is the official runtime's shape (NOSI's persistent H2D kernel): a fixed, small number of
programs loop over the misses only (`compact_misses` moves them to the front), so a fill on a second stream leaves
most SMs to the layer's compute.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from infer.host_store import HostKVStore


def _fill_kernel(src_ref, dst_ref, host_ref, _pk_in, _pv_in, pk_ref, pv_ref, *, width: int, half: int):
    j = pl.program_id(1)
    row = src_ref[0]
    dst = dst_ref[0]
    ok = jnp.broadcast_to(row >= 0, (width,))
    lane = jax.lax.broadcasted_iota(jnp.int32, (width,), 0)
    rows = jnp.broadcast_to(jnp.maximum(row, 0), (width,))
    val = pltriton.load(host_ref.at[rows, j * width + lane], mask=ok, other=0)
    drows = jnp.broadcast_to(jnp.maximum(dst, 0), (width,))
    cols = (j % half) * width + lane
    pltriton.store(pk_ref.at[drows, cols], val, mask=ok & (j < half))
    pltriton.store(pv_ref.at[drows, cols], val, mask=ok & (j >= half))


def _fill_layout(host: jax.Array, pool_k: jax.Array, width: int):
    """Checks that host rows are K+V of one pool block; returns (rows, row width, piece width, flat pool shape)."""
    b, kvh, p, s, d = pool_k.shape
    r, w = host.shape
    half_elems = s * d
    width = min(width, half_elems)
    if w != 2 * half_elems or half_elems % width:
        raise ValueError(f"host rows of {w} elements do not fit pool blocks of {s}x{d}")
    return r, w, width, (b * kvh * p, half_elems)


def fill_slots(host: jax.Array, src: jax.Array, dst: jax.Array, pool_k: jax.Array, pool_v: jax.Array, *,
               width: int = 2048, num_warps: int = 4, interpret: bool = False):
    """host [R, 2*S*D] (pinned_host on GPU); src, dst [N] int32 (host row, flat pool slot); pools [B, KV, P, S, D].
    Returns the pools with the listed slots overwritten (in place when the pools are donated)."""
    r, w, width, flat = _fill_layout(host, pool_k, width)
    half = flat[1] // width
    n = src.shape[0]
    whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0, 0))  # noqa: E731
    pk, pv = pl.pallas_call(
        functools.partial(_fill_kernel, width=width, half=half),
        grid=(n, 2 * half),
        in_specs=[pl.BlockSpec((1,), lambda i, j: (i,)), pl.BlockSpec((1,), lambda i, j: (i,)),
                  whole((r, w)), whole(flat), whole(flat)],
        out_specs=[whole(flat), whole(flat)],
        out_shape=[jax.ShapeDtypeStruct(flat, pool_k.dtype), jax.ShapeDtypeStruct(flat, pool_v.dtype)],
        input_output_aliases={3: 0, 4: 1},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="sparda_fill_slots",
    )(src, dst, host, pool_k.reshape(flat), pool_v.reshape(flat))
    return pk.reshape(pool_k.shape), pv.reshape(pool_v.shape)


def compact_misses(src: jax.Array, dst: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """src, dst [N] (-1 = hit) -> the same entries with the misses first, in order, -1 after them; and the number
    of misses [1] int32."""
    n = src.shape[0]
    miss = src >= 0
    target = jnp.where(miss, jnp.cumsum(miss) - 1, n)  # out of range = dropped
    empty = jnp.full((n,), -1, jnp.int32)
    return (empty.at[target].set(src, mode="drop"), empty.at[target].set(dst, mode="drop"),
            miss.sum(dtype=jnp.int32)[None])


def _persistent_fill_kernel(count_ref, src_ref, dst_ref, host_ref, _pk_in, _pv_in, pk_ref, pv_ref, *,
                            num_programs: int, width: int, half: int):
    pid = pl.program_id(0)
    mine = (count_ref[0] - pid + num_programs - 1) // num_programs  # entries pid, pid + P, ... below the count

    def copy_entry(it, carry):
        i = pid + it * num_programs
        row, dst = src_ref[i], dst_ref[i]
        for j in range(2 * half):  # unrolled: every piece's load is in flight before the stores wait on it
            val = host_ref[row, pl.ds(j * width, width)]
            out = pk_ref if j < half else pv_ref
            out[dst, pl.ds((j % half) * width, width)] = val
        return carry

    jax.lax.fori_loop(0, mine, copy_entry, 0)


def fill_slots_persistent(host: jax.Array, src: jax.Array, dst: jax.Array, count: jax.Array, pool_k: jax.Array,
                          pool_v: jax.Array, *, num_programs: int = 32, width: int = 2048, num_warps: int = 4,
                          interpret: bool = False):
    """As `fill_slots`, for entries compacted by `compact_misses` (count [1]: how many lead), with `num_programs`
    programs each looping over every num_programs-th miss. NOSI runs 16 (batch <= 16) or 32 CTAs on the H100."""
    r, w, width, flat = _fill_layout(host, pool_k, width)
    if num_programs <= 0:
        raise ValueError(f"num_programs must be positive, got {num_programs}")
    n = src.shape[0]
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
    pk, pv = pl.pallas_call(
        functools.partial(_persistent_fill_kernel, num_programs=num_programs, width=width,
                          half=flat[1] // width),
        grid=(num_programs,),
        in_specs=[whole((1,)), whole((n,)), whole((n,)), whole((r, w)), whole(flat), whole(flat)],
        out_specs=[whole(flat), whole(flat)],
        out_shape=[jax.ShapeDtypeStruct(flat, pool_k.dtype), jax.ShapeDtypeStruct(flat, pool_v.dtype)],
        input_output_aliases={4: 0, 5: 1},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="sparda_fill_slots_persistent",
    )(count, src, dst, host, pool_k.reshape(flat), pool_v.reshape(flat))
    return pk.reshape(pool_k.shape), pv.reshape(pool_v.shape)


def host_arrays(store: HostKVStore, layers=None) -> list[jax.Array]:
    """Per-layer [rows, 2*S*D] JAX views of the host store. GPU: zero-copy `pinned_host` arrays over the pinned torch
    memory (shape and dtype set in torch before DLPack). CPU (tests): device copies of the numpy store."""
    layers = range(store.num_layers) if layers is None else layers
    if jax.default_backend() != "gpu":
        return [jnp.asarray(store.flat(i)) for i in layers]
    import torch

    if store.torch_layer(0) is None:
        raise RuntimeError("the zero-copy path needs the host store in pinned (torch) memory")
    out = []
    for i in layers:
        # A view of a larger store (benchmarks) shares its row numbering: rows of sequence b < batch are the same.
        t = store.torch_layer(i).view(torch.bfloat16 if store.dtype == np.dtype(jnp.bfloat16) else torch.float32)
        out.append(jax.dlpack.from_dlpack(t.reshape(-1, store.row_elems)))
    return out

"""Block-sparse GQA decode attention over a pool of KV blocks (Pallas, Triton backend).

One new token per sequence. For each (sequence b, KV head h) the caller lists N pool blocks (`slot_ids`) and how many
leading tokens of each are valid (`slot_lengths`); the G query heads of that KV group attend, with one softmax, to all
valid tokens of all listed blocks.

Layout of the kernel (flash-decoding):
  * grid = (B*KV, num_splits). Program (bh, s) owns the s-th contiguous chunk of the slot list of (b, h).
  * The whole K/V pool of (b, h) is passed as one block (in Triton that is only a base pointer), viewed as rows
    [P*S, D], and read with masked row gathers `k_ref.at[rows, cols]` (a [64, D] tile per loop step by default) that
    feed the dots directly. Tokens past a block's valid length and empty (-1) entries are masked in the load itself,
    so they cost no memory traffic.
  * Each program loads its slice of the slot list once, before the loop ("preload"), and picks step t's ids out of
    registers, so no gather address depends on a load inside the loop and Triton's software pipeliner (num_stages=2)
    keeps the next tile's reads in flight. (Measured on the H100: this, plus row gathers instead of [n, S, D] block
    gathers + reshape, took B=8 x 32K from 50% to 66% of HBM peak; bench_results/kernels/NOTES.md.)
  * Splits: at least 4 programs per SM and at most 32 loop steps per program (decode_launch_config).
  * The G query heads are the M dimension of both dots, padded to >= 16 (Triton's dot minimum).
  * Each program writes an unnormalised partial output with its running max and sum (log2 domain); the splits are
    merged in plain JAX after the call ("the last round of flash attention").

Pallas has no scalar prefetch on GPU, hence the in-kernel gathers. Block size S comes from the pool's shape.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import (
    LOG2E,
    NEG_INF,
    check_float,
    check_int32,
    dot_precision,
    gather_rows,
    is_pow2,
    next_pow2,
    num_sms,
    pad_axis,
    resolve_implementation,
    select_tile,
)

__all__ = ["sparse_decode_attention", "sparse_decode_attention_reference", "decode_launch_config"]


# ----------------------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------------------
def _sparse_decode_kernel(
    q_ref,  # [Gp, D]
    k_ref,  # [P * S, D]   whole pool of this (b, h), blocks flattened into rows
    v_ref,  # [P * S, D]
    ids_ref,  # [entries_per_split] int32
    lens_ref,  # [entries_per_split] int32
    o_ref,  # [Gp, D] float32, unnormalised
    m_ref,  # [Gp] float32, running max (log2 domain)
    l_ref,  # [Gp] float32, running sum
    *,
    scale_log2: float,
    block_size: int,
    blocks_per_tile: int,
    precision,
    id_source: str,
    kv_prefetch: bool,
):
    gp, head_dim = q_ref.shape
    num_blocks = k_ref.shape[0] // block_size
    entries = ids_ref.shape[0]
    nb = blocks_per_tile
    tile = nb * block_size
    num_tiles = entries // nb

    q = q_ref[...]
    token = lax.broadcasted_iota(jnp.int32, (nb, block_size), 1)

    # Where step t's slot ids come from.
    if id_source == "preload":
        # The split's whole list, loaded once; step t picks its row with a masked sum (no load inside the loop), so the
        # gather addresses depend on no in-loop load and Triton's software pipeliner can issue them stages ahead.
        id_table = ids_ref[...].reshape(num_tiles, nb)
        len_table = lens_ref[...].reshape(num_tiles, nb)

        def entries_of(t):
            return select_tile(id_table, t), select_tile(len_table, t)
    elif id_source in ("loop", "prefetch"):

        def entries_of(t):
            sl = pl.ds(t * nb, nb)
            return ids_ref[sl], lens_ref[sl]
    else:
        raise ValueError(f"id_source must be 'preload', 'prefetch' or 'loop', got {id_source!r}")

    def rows_and_mask(ids, lens, live=True):
        present = ids >= 0
        safe_ids = jnp.minimum(jnp.maximum(ids, 0), num_blocks - 1)
        n_valid = jnp.where(present & live, lens, 0)
        rows = (safe_ids[:, None] * block_size + token).reshape(tile)
        ok = (token < n_valid[:, None]).reshape(tile)
        return rows, ok

    def load_kv(rows, ok):
        # Both gathers are issued before the first use, so the two reads are in flight together.
        return gather_rows(k_ref, rows, ok), gather_rows(v_ref, rows, ok)  # [tile, D] each

    def update(acc, m_prev, l_prev, k, v, ok):
        s = pltriton.dot(q, k, trans_b=True, precision=precision) * scale_log2  # [Gp, tile] float32
        s = jnp.where(ok[None, :], s, NEG_INF)
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        alpha = jnp.exp2(m_prev - m_next)
        # Masked logits give exp2(NEG_INF - m) = 0 once m is real. While a row has seen nothing valid (m == NEG_INF)
        # they give 1, but V is 0 there (masked load), and the first real m wipes l and acc through alpha = 0; a row
        # that never sees anything keeps m == NEG_INF and is zeroed in the merge.
        p = jnp.exp2(s - m_next[:, None])
        l_next = l_prev * alpha + p.sum(axis=1)
        acc = acc * alpha[:, None] + pltriton.dot(p.astype(v.dtype), v, precision=precision)
        return acc, m_next, l_next

    acc = jnp.zeros((gp, head_dim), jnp.float32)
    m_i = jnp.full((gp,), NEG_INF, jnp.float32)
    l_i = jnp.zeros((gp,), jnp.float32)

    if kv_prefetch:
        # Register double buffering: step t issues the gathers of step t + 1 before computing on the tiles loaded in
        # step t - 1 (the step after the last one is fully masked: no memory traffic).
        def load_step(t):
            live = t < num_tiles
            ids, lens = entries_of(jnp.minimum(t, num_tiles - 1))
            rows, ok = rows_and_mask(ids, lens, live)
            return load_kv(rows, ok) + (ok,)

        def body(t, carry):
            acc, m_prev, l_prev, k, v, ok = carry
            nxt = load_step(t + 1)
            return update(acc, m_prev, l_prev, k, v, ok) + nxt

        acc, m_i, l_i = lax.fori_loop(0, num_tiles, body, (acc, m_i, l_i) + load_step(0))[:3]
    elif id_source == "prefetch":
        # The ids of step t were loaded in step t - 1; step t loads those of step t + 1.
        def body(t, carry):
            acc, m_prev, l_prev, ids, lens = carry
            nxt = entries_of(jnp.minimum(t + 1, num_tiles - 1))
            rows, ok = rows_and_mask(ids, lens)
            k, v = load_kv(rows, ok)
            return update(acc, m_prev, l_prev, k, v, ok) + nxt

        acc, m_i, l_i = lax.fori_loop(0, num_tiles, body, (acc, m_i, l_i) + entries_of(0))[:3]
    else:

        def body(t, carry):
            rows, ok = rows_and_mask(*entries_of(t))
            k, v = load_kv(rows, ok)
            return update(*carry, k, v, ok)

        acc, m_i, l_i = lax.fori_loop(0, num_tiles, body, (acc, m_i, l_i))
    o_ref[...] = acc
    m_ref[...] = m_i
    l_ref[...] = l_i


# ----------------------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------------------
def decode_launch_config(
    batch_heads: int,
    num_entries: int,
    block_size: int,
    *,
    num_splits: int | None = None,
    blocks_per_tile: int | None = None,
    sm_count: int | None = None,
    programs_per_sm: int = 4,
    max_tiles_per_split: int = 32,
    pow2_tiles: bool = True,
) -> tuple[int, int, int]:
    """Returns (blocks_per_tile, num_splits, tiles_per_split) for B*KV = `batch_heads` lists of `num_entries` blocks.

    Default tile: 64 tokens per loop step. Default splits: at least `programs_per_sm` programs per SM, and no program
    longer than `max_tiles_per_split` steps (many short programs keep the last wave's tail small). With `pow2_tiles`
    the steps per program are a power of two (the "preload" id source loads the whole list as one tensor).
    """
    if blocks_per_tile is None:
        blocks_per_tile = max(1, 64 // block_size)
    if not is_pow2(blocks_per_tile):
        raise ValueError(f"blocks_per_tile must be a power of two, got {blocks_per_tile}")
    num_tiles = max(1, -(-num_entries // blocks_per_tile))
    if num_splits is None:
        sm = sm_count if sm_count is not None else num_sms()
        want = -(-(programs_per_sm * sm) // batch_heads)
        num_splits = max(want, -(-num_tiles // max_tiles_per_split))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    num_splits = min(num_splits, num_tiles)
    tiles_per_split = -(-num_tiles // num_splits)
    if pow2_tiles:
        tiles_per_split = next_pow2(tiles_per_split)
    num_splits = -(-num_tiles // tiles_per_split)
    return blocks_per_tile, num_splits, tiles_per_split


# ----------------------------------------------------------------------------------------------------------------------
# pallas_call wrapper
# ----------------------------------------------------------------------------------------------------------------------
def _sparse_decode_pallas(
    q,
    k_pool,
    v_pool,
    slot_ids,
    slot_lengths,
    *,
    sm_scale,
    num_splits,
    blocks_per_tile,
    num_warps,
    num_stages,
    id_source,
    max_tiles_per_split,
    kv_prefetch,
    interpret,
):
    batch, kv_heads, group, head_dim = q.shape
    _, _, num_blocks, block_size, _ = k_pool.shape
    n = slot_ids.shape[-1]
    bh = batch * kv_heads

    if not is_pow2(block_size):
        raise ValueError(f"the Pallas kernel needs a power-of-two block size (S of k_pool), got {block_size}")
    nb, splits, tiles_per_split = decode_launch_config(
        bh,
        n,
        block_size,
        num_splits=num_splits,
        blocks_per_tile=blocks_per_tile,
        max_tiles_per_split=max_tiles_per_split,
        pow2_tiles=(id_source == "preload"),
    )
    if nb * block_size < 16:
        raise ValueError(f"blocks_per_tile * block_size must be >= 16 (Triton dot), got {nb} * {block_size}")
    entries_per_split = tiles_per_split * nb
    total_entries = splits * entries_per_split

    # Triton wants power-of-two tensors with dot dims >= 16: pad the query heads (M) and, if needed, head_dim.
    gp = max(16, next_pow2(group))
    dp = max(16, next_pow2(head_dim))
    q2 = pad_axis(q.reshape(bh, group, head_dim), 1, gp)
    k2 = k_pool.reshape(bh, num_blocks * block_size, head_dim)
    v2 = v_pool.reshape(bh, num_blocks * block_size, head_dim)
    if dp != head_dim:  # costs a copy of the pool; only for unusual head sizes
        q2, k2, v2 = (pad_axis(x, x.ndim - 1, dp) for x in (q2, k2, v2))
    ids = pad_axis(slot_ids.reshape(bh, n), 1, total_entries, value=-1).reshape(bh, splits, entries_per_split)
    lens = pad_axis(slot_lengths.reshape(bh, n), 1, total_entries, value=0).reshape(bh, splits, entries_per_split)

    kernel = functools.partial(
        _sparse_decode_kernel,
        scale_log2=float(sm_scale) * LOG2E,
        block_size=block_size,
        blocks_per_tile=nb,
        precision=dot_precision(q.dtype, interpret),
        id_source=id_source,
        kv_prefetch=kv_prefetch,
    )
    rows = num_blocks * block_size
    o, m, l = pl.pallas_call(
        kernel,
        grid=(bh, splits),
        in_specs=[
            pl.BlockSpec((None, gp, dp), lambda i, s: (i, 0, 0)),
            pl.BlockSpec((None, rows, dp), lambda i, s: (i, 0, 0)),
            pl.BlockSpec((None, rows, dp), lambda i, s: (i, 0, 0)),
            pl.BlockSpec((None, None, entries_per_split), lambda i, s: (i, s, 0)),
            pl.BlockSpec((None, None, entries_per_split), lambda i, s: (i, s, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, gp, dp), lambda i, s: (i, s, 0, 0)),
            pl.BlockSpec((None, None, gp), lambda i, s: (i, s, 0)),
            pl.BlockSpec((None, None, gp), lambda i, s: (i, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((bh, splits, gp, dp), jnp.float32),
            jax.ShapeDtypeStruct((bh, splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((bh, splits, gp), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"sparse_decode_S{block_size}_nb{nb}_G{gp}_D{dp}_{id_source}{'_kvpf' if kv_prefetch else ''}",
    )(q2, k2, v2, ids, lens)

    # Merge the splits (log2 domain). A split that saw no valid token has m = NEG_INF, so its weight is 0 unless no
    # split saw anything, in which case the row is zero.
    o = o[:, :, :group, :head_dim]
    m = m[:, :, :group]
    l = l[:, :, :group]
    m_all = m.max(axis=1)
    w = jnp.exp2(m - m_all[:, None])
    l_all = (w * l).sum(axis=1)
    o_all = (w[..., None] * o).sum(axis=1)
    seen = (m_all > 0.5 * NEG_INF) & (l_all > 0)
    out = jnp.where(seen[..., None], o_all / jnp.where(seen, l_all, 1.0)[..., None], 0.0)
    return out.reshape(batch, kv_heads, group, head_dim).astype(q.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------------
def _validate(q, k_pool, v_pool, slot_ids, slot_lengths):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, KV, G, D], got shape {q.shape}")
    if k_pool.ndim != 5:
        raise ValueError(f"k_pool must be [B, KV, P, S, D], got shape {k_pool.shape}")
    if v_pool.shape != k_pool.shape:
        raise ValueError(f"v_pool shape {v_pool.shape} must equal k_pool shape {k_pool.shape}")
    batch, kv_heads, _, head_dim = q.shape
    if k_pool.shape[:2] != (batch, kv_heads) or k_pool.shape[-1] != head_dim:
        raise ValueError(
            f"k_pool {k_pool.shape} does not match q {q.shape}: expected [B={batch}, KV={kv_heads}, P, S, D={head_dim}]"
        )
    if slot_ids.ndim != 3 or slot_ids.shape[:2] != (batch, kv_heads):
        raise ValueError(f"slot_ids must be [B={batch}, KV={kv_heads}, N], got shape {slot_ids.shape}")
    if slot_lengths.shape != slot_ids.shape:
        raise ValueError(f"slot_lengths shape {slot_lengths.shape} must equal slot_ids shape {slot_ids.shape}")
    if min(q.shape) == 0 or min(k_pool.shape) == 0 or slot_ids.shape[-1] == 0:
        raise ValueError(f"empty dimension: q {q.shape}, k_pool {k_pool.shape}, slot_ids {slot_ids.shape}")
    check_float("q", q)
    check_float("k_pool", k_pool)
    if k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        raise ValueError(f"q, k_pool, v_pool must share one dtype, got {q.dtype}, {k_pool.dtype}, {v_pool.dtype}")
    check_int32("slot_ids", slot_ids)
    check_int32("slot_lengths", slot_lengths)


def _reference(q, k_pool, v_pool, slot_ids, slot_lengths, sm_scale):
    batch, kv_heads, num_blocks, block_size, head_dim = k_pool.shape
    n = slot_ids.shape[-1]
    safe = jnp.clip(slot_ids, 0, num_blocks - 1)
    idx = safe[:, :, :, None, None]
    k = jnp.take_along_axis(k_pool, idx, axis=2).reshape(batch, kv_heads, n * block_size, head_dim)
    v = jnp.take_along_axis(v_pool, idx, axis=2).reshape(batch, kv_heads, n * block_size, head_dim)
    n_valid = jnp.where(slot_ids >= 0, jnp.clip(slot_lengths, 0, block_size), 0)
    valid = (jnp.arange(block_size)[None, None, None, :] < n_valid[..., None]).reshape(batch, kv_heads, n * block_size)

    logits = (
        jnp.einsum("bhgd,bhtd->bhgt", q, k, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
        * sm_scale
    )
    logits = jnp.where(valid[:, :, None, :], logits, -jnp.inf)
    m = logits.max(axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(valid[:, :, None, :], jnp.exp(logits - m), 0.0)
    l = p.sum(axis=-1, keepdims=True)
    v32 = jnp.where(valid[..., None], v.astype(jnp.float32), 0.0)  # garbage (even NaN) in invalid rows must not leak
    o = jnp.einsum("bhgt,bhtd->bhgd", p, v32, precision=lax.Precision.HIGHEST)
    o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
    return o.astype(q.dtype)


@functools.partial(jax.jit, static_argnames=["sm_scale"])
def sparse_decode_attention_reference(q, k_pool, v_pool, slot_ids, slot_lengths, *, sm_scale=None):
    """Plain-jnp oracle: gather the listed blocks, masked softmax in float32. Same arguments as the kernel."""
    _validate(q, k_pool, v_pool, slot_ids, slot_lengths)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    return _reference(q, k_pool, v_pool, slot_ids, slot_lengths, sm_scale)


# ----------------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------------
@functools.partial(
    jax.jit,
    static_argnames=[
        "sm_scale",
        "implementation",
        "num_splits",
        "blocks_per_tile",
        "num_warps",
        "num_stages",
        "id_source",
        "max_tiles_per_split",
        "kv_prefetch",
    ],
)
def sparse_decode_attention(
    q,
    k_pool,
    v_pool,
    slot_ids,
    slot_lengths,
    *,
    sm_scale: float | None = None,
    implementation: str | None = None,
    num_splits: int | None = None,
    blocks_per_tile: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    id_source: str = "preload",
    max_tiles_per_split: int = 32,
    kv_prefetch: bool = False,
):
    """Block-sparse decode attention over a per-(sequence, KV head) pool of KV blocks.

    Args:
      q: [B, KV, G, D] the G query heads of each KV group, for the one new token.
      k_pool, v_pool: [B, KV, P, S, D] P blocks of S tokens per (sequence, KV head).
      slot_ids: [B, KV, N] int32, pool blocks to attend to; -1 = empty entry. Ids must be unique per list.
      slot_lengths: [B, KV, N] int32, valid prefix length (0..S) of each listed block; 0 = skip.
      sm_scale: softmax scale, default 1/sqrt(D).
      implementation: "pallas" (Triton kernel, GPU), "pallas_interpret" (same kernel, interpreted, any backend),
        "reference" (plain jnp) or None (= "pallas" when the default backend is a GPU, else "reference").
      num_splits: split-K factor (programs per (b, h) list); default from the SM count and the list length.
      blocks_per_tile, num_warps, num_stages, id_source, max_tiles_per_split: kernel tuning knobs (see
        decode_launch_config and _sparse_decode_kernel; id_source "preload" loads each program's slot list once,
        "prefetch" loads it one loop step ahead, "loop" in the step that uses it).

    Returns:
      [B, KV, G, D] in q.dtype. Rows whose lists hold no valid token are zeros.
    """
    _validate(q, k_pool, v_pool, slot_ids, slot_lengths)
    impl = resolve_implementation(implementation)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if impl == "reference":
        return _reference(q, k_pool, v_pool, slot_ids, slot_lengths, sm_scale)
    return _sparse_decode_pallas(
        q,
        k_pool,
        v_pool,
        slot_ids,
        slot_lengths,
        sm_scale=sm_scale,
        num_splits=num_splits,
        blocks_per_tile=blocks_per_tile,
        num_warps=num_warps,
        num_stages=num_stages,
        id_source=id_source,
        max_tiles_per_split=max_tiles_per_split,
        kv_prefetch=kv_prefetch,
        interpret=(impl == "pallas_interpret"),
    )

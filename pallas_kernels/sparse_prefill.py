"""Block-sparse causal GQA prefill attention (Pallas, Triton backend).

A chunk of Tq queries (absolute positions q_start + [0, Tq)) attends to the KV cache, but each query block of
`block_size` queries only to the KV blocks listed for it in `block_ids` (-1 = empty entry), with the causal mask applied
inside every listed block (so the diagonal block works) and positions >= kv_len[b] masked out.

Layout of the kernel (flash attention, one pass, online softmax):
  * grid = (B*KV, Tq/block_size, G/heads_per_program). A program owns `heads_per_program` query heads x one query
    block; those rows are the M dimension of both dots. Default 1 head (64 rows): on the H100, 2 heads per program
    (128 rows, each gathered K/V tile feeding both) measured slower (bench_results/kernels/).
  * The whole KV cache of (b, h) is one block (a base pointer); listed KV blocks are read with masked row gathers
    (`k_ref.at[rows, cols]`), 64 tokens per loop step, software-pipelined by Triton (num_stages).
  * Before the call the lists are compacted in plain JAX (valid ids first, ascending; ids past the causal diagonal or
    past kv_len dropped), and each program loops only over its own count of valid entries.
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
    pad_axis,
    resolve_implementation,
    select_tile,
)

__all__ = ["sparse_prefill_attention", "sparse_prefill_attention_reference", "compact_block_ids"]

_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------------------
def _sparse_prefill_kernel(
    q_ref,  # [gh, bq, D]
    k_ref,  # [Tk, D]   whole cache of this (b, h)
    v_ref,  # [Tk, D]
    ids_ref,  # [Np] int32, compacted: valid ids first
    info_ref,  # [4] int32: (count of valid ids, kv_len, q_start, unused)
    o_ref,  # [gh, bq, D]
    *,
    scale_log2: float,
    block_size: int,
    blocks_per_tile: int,
    precision,
    id_source: str,
):
    gh, bq, head_dim = q_ref.shape
    num_blocks = k_ref.shape[0] // block_size
    nb = blocks_per_tile
    tile = nb * block_size
    rows = gh * bq
    qb = pl.program_id(1)
    max_tiles = ids_ref.shape[0] // nb

    count = info_ref[0]
    kv_len = info_ref[1]
    q_start = info_ref[2]

    q = q_ref[...].reshape(rows, head_dim)
    q_pos = q_start + qb * bq + lax.broadcasted_iota(jnp.int32, (rows, 1), 0) % bq  # [rows, 1]
    token = lax.broadcasted_iota(jnp.int32, (nb, block_size), 1)

    if id_source == "preload":
        id_table = ids_ref[...].reshape(max_tiles, nb)

        def ids_of(t):
            return select_tile(id_table, t)
    elif id_source in ("loop", "prefetch"):

        def ids_of(t):
            return ids_ref[pl.ds(t * nb, nb)]
    else:
        raise ValueError(f"id_source must be 'preload', 'prefetch' or 'loop', got {id_source!r}")
    prefetch = id_source == "prefetch"

    def body(t, carry):
        if prefetch:  # ids of step t came from step t - 1; fetch those of t + 1 now
            acc, m_prev, l_prev, ids = carry
            nxt = (ids_of(jnp.minimum(t + 1, max_tiles - 1)),)
        else:
            acc, m_prev, l_prev = carry
            ids = ids_of(t)
        present = ids >= 0
        safe_ids = jnp.minimum(jnp.maximum(ids, 0), num_blocks - 1)
        kv_pos = (safe_ids[:, None] * block_size + token).reshape(tile)  # [tile]
        tok_ok = jnp.broadcast_to(present[:, None], (nb, block_size)).reshape(tile) & (kv_pos < kv_len)
        k = gather_rows(k_ref, kv_pos, tok_ok)  # [tile, D]
        v = gather_rows(v_ref, kv_pos, tok_ok)

        s = pltriton.dot(q, k, trans_b=True, precision=precision) * scale_log2  # [rows, tile]
        ok = tok_ok[None, :] & (kv_pos[None, :] <= q_pos)
        s = jnp.where(ok, s, NEG_INF)
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        alpha = jnp.exp2(m_prev - m_next)
        # exp2(NEG_INF - m) = 0 once m is real; junk from rows that have seen nothing yet (m == NEG_INF) is wiped by the
        # first real m (alpha = 0), and rows that never see anything are zeroed at the end.
        p = jnp.exp2(s - m_next[:, None])
        l_next = l_prev * alpha + p.sum(axis=1)
        acc = acc * alpha[:, None] + pltriton.dot(p.astype(v.dtype), v, precision=precision)
        if prefetch:
            return (acc, m_next, l_next) + nxt
        return acc, m_next, l_next

    acc = jnp.zeros((rows, head_dim), jnp.float32)
    m_i = jnp.full((rows,), NEG_INF, jnp.float32)
    l_i = jnp.zeros((rows,), jnp.float32)
    num_tiles = (count + nb - 1) // nb
    init = (acc, m_i, l_i) + ((ids_of(0),) if prefetch else ())
    acc, m_i, l_i = lax.fori_loop(0, num_tiles, body, init)[:3]
    seen = (m_i > 0.5 * NEG_INF) & (l_i > 0)
    out = jnp.where(seen[:, None], acc / jnp.where(seen, l_i, 1.0)[:, None], 0.0)
    o_ref[...] = out.reshape(gh, bq, head_dim).astype(o_ref.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------
def compact_block_ids(block_ids, kv_len, q_start, block_size):
    """Drops entries that can hold no visible token and moves the rest to the front, ascending.

    block_ids [B, KV, nQB, N]; an entry survives if 0 <= id < number of KV blocks is not required (ids are clamped by
    the kernel), but it must be >= 0, start at or before the last query position of its query block, and start before
    kv_len[b]. Returns (compacted ids with -1 tail, counts [B, KV, nQB]).
    """
    nqb = block_ids.shape[2]
    last_q = q_start + (jnp.arange(nqb, dtype=jnp.int32) + 1) * block_size - 1  # [nQB]
    start = block_ids * block_size
    keep = (block_ids >= 0) & (start <= last_q[None, None, :, None]) & (start < kv_len[:, None, None, None])
    key = jnp.where(keep, block_ids, _INT32_MAX)
    key = jnp.sort(key, axis=-1)
    ids = jnp.where(key == _INT32_MAX, -1, key)
    return ids, keep.sum(axis=-1).astype(jnp.int32)


def _default_heads_per_program(group: int, block_q: int) -> int:
    # One head per program (measured fastest on the H100 at block 64: bench_results/kernels/); more only when needed
    # to give the dots the 16 rows Triton requires.
    h = 1
    while h * block_q < 16 and group % (h * 2) == 0:
        h *= 2
    return h


# ----------------------------------------------------------------------------------------------------------------------
# pallas_call wrapper
# ----------------------------------------------------------------------------------------------------------------------
def _sparse_prefill_pallas(
    q,
    k,
    v,
    block_ids,
    kv_len,
    q_start,
    *,
    block_size,
    sm_scale,
    heads_per_program,
    blocks_per_tile,
    num_warps,
    num_stages,
    id_source,
    interpret,
):
    batch, kv_heads, group, tq, head_dim = q.shape
    tk = k.shape[2]
    nqb, n = block_ids.shape[2], block_ids.shape[3]
    bh = batch * kv_heads

    if not is_pow2(block_size):
        raise ValueError(f"the Pallas kernel needs a power-of-two block_size, got {block_size}")
    gh = heads_per_program if heads_per_program is not None else _default_heads_per_program(group, block_size)
    if group % gh or not is_pow2(gh):
        raise ValueError(f"heads_per_program must be a power of two dividing G={group}, got {gh}")
    if gh * block_size < 16:
        raise ValueError(f"heads_per_program * block_size must be >= 16 (Triton dot), got {gh} * {block_size}")
    nb = blocks_per_tile if blocks_per_tile is not None else max(1, 64 // block_size)
    if not is_pow2(nb) or nb * block_size < 16:
        raise ValueError(f"blocks_per_tile must be a power of two with blocks_per_tile * block_size >= 16, got {nb}")

    ids, counts = compact_block_ids(block_ids, kv_len, q_start, block_size)
    n_pad = -(-n // nb) * nb
    if id_source == "preload":  # the whole list is loaded as one tensor: power-of-two length
        n_pad = next_pow2(n_pad)
    ids = pad_axis(ids.reshape(bh, nqb, n), 2, n_pad, value=-1)
    info = jnp.stack(
        [
            counts.reshape(bh, nqb),
            jnp.broadcast_to(jnp.repeat(kv_len, kv_heads)[:, None], (bh, nqb)),
            jnp.broadcast_to(jnp.asarray(q_start, jnp.int32), (bh, nqb)),
            jnp.zeros((bh, nqb), jnp.int32),
        ],
        axis=-1,
    ).astype(jnp.int32)

    dp = max(16, next_pow2(head_dim))
    q2 = q.reshape(bh, group, tq, head_dim)
    k2 = k.reshape(bh, tk, head_dim)
    v2 = v.reshape(bh, tk, head_dim)
    if dp != head_dim:  # costs a copy of the cache; only for unusual head sizes
        q2, k2, v2 = (pad_axis(x, x.ndim - 1, dp) for x in (q2, k2, v2))

    kernel = functools.partial(
        _sparse_prefill_kernel,
        scale_log2=float(sm_scale) * LOG2E,
        block_size=block_size,
        blocks_per_tile=nb,
        precision=dot_precision(q.dtype, interpret),
        id_source=id_source,
    )
    out = pl.pallas_call(
        kernel,
        grid=(bh, nqb, group // gh),
        in_specs=[
            pl.BlockSpec((None, gh, block_size, dp), lambda i, j, h: (i, h, j, 0)),
            pl.BlockSpec((None, tk, dp), lambda i, j, h: (i, 0, 0)),
            pl.BlockSpec((None, tk, dp), lambda i, j, h: (i, 0, 0)),
            pl.BlockSpec((None, None, n_pad), lambda i, j, h: (i, j, 0)),
            pl.BlockSpec((None, None, 4), lambda i, j, h: (i, j, 0)),
        ],
        out_specs=pl.BlockSpec((None, gh, block_size, dp), lambda i, j, h: (i, h, j, 0)),
        out_shape=jax.ShapeDtypeStruct((bh, group, tq, dp), q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"sparse_prefill_S{block_size}_gh{gh}_nb{nb}_D{dp}",
    )(q2, k2, v2, ids, info)
    return out[..., :head_dim].reshape(batch, kv_heads, group, tq, head_dim)


# ----------------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------------
def _validate(q, k, v, block_ids, kv_len, block_size):
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if q.ndim != 5:
        raise ValueError(f"q must be [B, KV, G, Tq, D], got shape {q.shape}")
    if k.ndim != 4:
        raise ValueError(f"k must be [B, KV, Tk, D], got shape {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v shape {v.shape} must equal k shape {k.shape}")
    batch, kv_heads, _, tq, head_dim = q.shape
    if k.shape[:2] != (batch, kv_heads) or k.shape[-1] != head_dim:
        raise ValueError(
            f"k {k.shape} does not match q {q.shape}: expected [B={batch}, KV={kv_heads}, Tk, D={head_dim}]"
        )
    if min(q.shape) == 0 or min(k.shape) == 0:
        raise ValueError(f"empty dimension: q {q.shape}, k {k.shape}")
    if tq % block_size:
        raise ValueError(f"Tq={tq} must be a multiple of block_size={block_size}")
    if k.shape[2] % block_size:
        raise ValueError(f"Tk={k.shape[2]} must be a multiple of block_size={block_size}")
    if block_ids.ndim != 4 or block_ids.shape[:3] != (batch, kv_heads, tq // block_size) or block_ids.shape[3] == 0:
        raise ValueError(
            f"block_ids must be [B={batch}, KV={kv_heads}, Tq/block_size={tq // block_size}, N>0], "
            f"got {block_ids.shape}"
        )
    if kv_len.shape != (batch,):
        raise ValueError(f"kv_len must be [B={batch}], got shape {kv_len.shape}")
    check_float("q", q)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_int32("block_ids", block_ids)
    check_int32("kv_len", kv_len)


def _check_q_start(q_start):
    if isinstance(q_start, (int,)) or (hasattr(q_start, "shape") and q_start.shape == ()):
        if hasattr(q_start, "dtype") and not jnp.issubdtype(q_start.dtype, jnp.integer):
            raise ValueError(f"q_start must be an integer scalar, got dtype {q_start.dtype}")
        return jnp.asarray(q_start, jnp.int32)
    raise ValueError(f"q_start must be an int or an integer scalar array, got {q_start!r}")


def _reference(q, k, v, block_ids, kv_len, q_start, block_size, sm_scale):
    batch, kv_heads, group, tq, head_dim = q.shape
    tk = k.shape[2]
    nkb = tk // block_size
    # listed[b, h, i, j]: query block i lists KV block j.
    onehot = (jnp.clip(block_ids, 0, nkb - 1)[..., None] == jnp.arange(nkb)) & (block_ids >= 0)[..., None]
    listed = onehot.any(axis=3)  # [B, KV, nQB, nKB]
    listed_tok = jnp.repeat(jnp.repeat(listed, block_size, axis=2), block_size, axis=3)  # [B, KV, Tq, Tk]
    q_pos = q_start + jnp.arange(tq)
    kv_pos = jnp.arange(tk)
    visible = (kv_pos[None, :] <= q_pos[:, None])[None, None] & (
        kv_pos[None, None, None, :] < kv_len[:, None, None, None]
    )
    mask = (listed_tok & visible)[:, :, None]  # [B, KV, 1, Tq, Tk]

    logits = (
        jnp.einsum("bhgqd,bhkd->bhgqk", q, k, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
        * sm_scale
    )
    logits = jnp.where(mask, logits, -jnp.inf)
    m = logits.max(axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(logits - m), 0.0)
    l = p.sum(axis=-1, keepdims=True)
    o = jnp.einsum("bhgqk,bhkd->bhgqd", p, v.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
    return o.astype(q.dtype)


@functools.partial(jax.jit, static_argnames=["sm_scale", "block_size"])
def sparse_prefill_attention_reference(q, k, v, block_ids, kv_len, *, q_start=0, sm_scale=None, block_size=64):
    """Plain-jnp oracle (dense masked softmax in float32). Same arguments as the kernel."""
    _validate(q, k, v, block_ids, kv_len, block_size)
    q_start = _check_q_start(q_start)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    return _reference(q, k, v, block_ids, kv_len, q_start, block_size, sm_scale)


# ----------------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------------
@functools.partial(
    jax.jit,
    static_argnames=[
        "sm_scale",
        "implementation",
        "block_size",
        "heads_per_program",
        "blocks_per_tile",
        "num_warps",
        "num_stages",
        "id_source",
    ],
)
def sparse_prefill_attention(
    q,
    k,
    v,
    block_ids,
    kv_len,
    *,
    q_start=0,
    sm_scale: float | None = None,
    implementation: str | None = None,
    block_size: int = 64,
    heads_per_program: int | None = None,
    blocks_per_tile: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    id_source: str = "prefetch",
):
    """Block-sparse causal prefill attention.

    Args:
      q: [B, KV, G, Tq, D] a chunk of Tq queries (multiple of block_size) at absolute positions q_start + [0, Tq).
      k, v: [B, KV, Tk, D] the KV cache (Tk multiple of block_size); positions >= kv_len[b] are invalid.
      block_ids: [B, KV, Tq // block_size, N] int32 KV blocks each query block attends to; -1 = empty. Ids must be
        unique per list (duplicates would be counted twice by the kernel).
      kv_len: [B] int32.
      q_start: int or traced int32 scalar, a multiple of block_size.
      sm_scale: default 1/sqrt(D).
      implementation: "pallas", "pallas_interpret", "reference" or None (= "pallas" on GPU, else "reference").
      block_size: tokens per query and KV block (64 in the model).
      heads_per_program, blocks_per_tile, num_warps, num_stages, id_source: kernel tuning knobs (defaults, the fastest
        measured on an H100: one query head per program (64 rows), 64 KV tokens per loop step, 4 warps, 3 pipeline
        stages, block ids loaded one loop step ahead).

    Returns:
      [B, KV, G, Tq, D] in q.dtype; rows that see no valid token are zeros.
    """
    _validate(q, k, v, block_ids, kv_len, block_size)
    q_start = _check_q_start(q_start)
    impl = resolve_implementation(implementation)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if impl == "reference":
        return _reference(q, k, v, block_ids, kv_len, q_start, block_size, sm_scale)
    return _sparse_prefill_pallas(
        q,
        k,
        v,
        block_ids,
        kv_len,
        q_start,
        block_size=block_size,
        sm_scale=sm_scale,
        heads_per_program=heads_per_program,
        blocks_per_tile=blocks_per_tile,
        num_warps=num_warps,
        num_stages=num_stages,
        id_source=id_source,
        interpret=(impl == "pallas_interpret"),
    )

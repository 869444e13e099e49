"""SparDA block selection (SPARDA.md §2-4): compressed keys, selector scores, block pooling, forced blocks, top-k.

Pure functions over explicit shapes; the model, the training loss and the offload engine all call these.

Shapes: B batch, KV kv heads, G query heads per group, T query tokens, C compressed keys, NB key blocks, D head dim.

Visibility: a compressed key is visible to the token at position t when all of its tokens precede t
(`stride*c + kernel <= t`). Both selectors use this rule, so layer l+1's selection depends only on KV that exists
before the token's own layer-l+1 keys are computed, which is what lets the Forecast run one layer early.
The newest keys this excludes always lie inside the forced local window when `local_blocks >= 1`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparda_jax.config import SparseConfig

_LOWEST = jnp.finfo(jnp.float32).min


def num_compressed_keys(num_tokens: int, cfg: SparseConfig) -> int:
    """How many compressed keys are complete once `num_tokens` keys exist."""
    return max(0, (num_tokens - cfg.compress_kernel) // cfg.compress_stride + 1)


def compress_keys(k: jax.Array, cfg: SparseConfig) -> jax.Array:
    """[..., T, D] post-RoPE keys -> [..., C, D] with Kc[c] = mean(K[stride*c : stride*c + kernel])."""
    *lead, t, d = k.shape
    stride, per_key = cfg.compress_stride, cfg.compress_kernel // cfg.compress_stride
    n = num_compressed_keys(t, cfg)
    if n == 0:
        return jnp.zeros((*lead, 0, d), k.dtype)
    chunks = k[..., : (t // stride) * stride, :].astype(jnp.float32)
    chunks = chunks.reshape(*lead, t // stride, stride, d).mean(axis=-2)
    # Each compressed key averages `per_key` consecutive stride-chunks.
    kc = sum(chunks[..., i: i + n, :] for i in range(per_key)) / per_key
    return kc.astype(k.dtype)


def latest_compressed_key(k_cache: jax.Array, position: jax.Array, cfg: SparseConfig) -> tuple[jax.Array, jax.Array]:
    """The newest complete compressed key once the key at `position` is written: (index, value [..., D]).

    k_cache: [KV, Tmax, D] of one sequence; position: scalar. Before the first key completes, index 0 holds a
    partial mean that stays invisible until a later call overwrites it with the complete one.
    """
    index = jnp.maximum((position + 1 - cfg.compress_kernel) // cfg.compress_stride, 0)
    window = jax.lax.dynamic_slice_in_dim(k_cache, index * cfg.compress_stride, cfg.compress_kernel, axis=-2)
    return index, window.astype(jnp.float32).mean(axis=-2).astype(k_cache.dtype)


def num_visible_compressed(positions: jax.Array, cfg: SparseConfig) -> jax.Array:
    """Compressed keys complete strictly before each position: [...] int32."""
    return jnp.maximum((positions - cfg.compress_kernel) // cfg.compress_stride + 1, 0).astype(jnp.int32)


def _visible_mask(positions: jax.Array, num_keys: int, cfg: SparseConfig) -> jax.Array:
    """[B, T] positions -> [B, 1, T, C] bool."""
    visible = jnp.arange(num_keys) < num_visible_compressed(positions, cfg)[..., None]
    return visible[:, None]


def query_selector_scores(q: jax.Array, kc: jax.Array, positions: jax.Array, cfg: SparseConfig) -> jax.Array:
    """s[b, g, t, c] = sum_{h in group g} softmax_c(q[h, t] . Kc[c] / sqrt(d)) over visible c; -inf where invisible.

    q: [B, KV, G, T, D] post-RoPE queries; kc: [B, KV, C, D]; positions: [B, T].
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bkgtd,bkcd->bkgtc", q.astype(jnp.float32), kc.astype(jnp.float32)) * scale
    visible = _visible_mask(positions, kc.shape[-2], cfg)[:, :, None]
    logits = jnp.where(visible, logits, -jnp.inf)
    probs = jnp.where(visible, jax.nn.softmax(jnp.where(visible, logits, _LOWEST), axis=-1), 0.0)
    return jnp.where(visible[:, :, 0], probs.sum(axis=2), -jnp.inf)


def forecast_scores(f: jax.Array, kc: jax.Array, positions: jax.Array, cfg: SparseConfig) -> jax.Array:
    """s[b, g, t, c] = f[b, g, t] . Kc[b, g, c] (raw dot product); -inf where invisible.

    f: [B, KV, T, D] post-RoPE Forecast output of the previous layer (or layer 0's q_select).
    """
    s = jnp.einsum("bktd,bkcd->bktc", f.astype(jnp.float32), kc.astype(jnp.float32))
    return jnp.where(_visible_mask(positions, kc.shape[-2], cfg), s, -jnp.inf)


def block_scores(s: jax.Array, num_blocks: int, cfg: SparseConfig) -> jax.Array:
    """Max-pool compressed-key scores onto the blocks they overlap: [..., C] -> [..., NB].

    With block 64, stride 16, kernel 32 this is B[j] = max(s[c] for c in [4j-1, 4j+3]) (kernel 5, stride 4, pad 1).
    """
    per_block = cfg.compressed_per_block
    pad_front = cfg.compress_kernel // cfg.compress_stride - 1
    window = per_block + pad_front
    needed = per_block * num_blocks + window
    pad_back = max(needed - pad_front - s.shape[-1], 0)
    padded = jnp.pad(s, [(0, 0)] * (s.ndim - 1) + [(pad_front, pad_back)], constant_values=-jnp.inf)
    starts = jnp.arange(num_blocks) * per_block
    return jnp.max(jnp.stack([padded[..., starts + o] for o in range(window)], axis=0), axis=0)


def select_blocks(scores: jax.Array, query_block: jax.Array, cfg: SparseConfig) -> jax.Array:
    """Top-k blocks per query: forced sink + local window, never a block after the query's own.

    scores: [..., NB] block scores; query_block: [...] index of the block holding the query (int32).
    Returns [..., min(top_k_blocks, NB)] int32 block ids, best first, -1 where fewer blocks are visible.
    """
    num_blocks = scores.shape[-1]
    blocks = jnp.arange(num_blocks)
    current = query_block[..., None]
    visible = blocks <= current
    forced = visible & ((blocks == 0) | (blocks >= current - cfg.local_blocks))
    # Visible blocks rank above invisible ones even when no compressed key scored them.
    ranked = jnp.where(forced, jnp.inf, jnp.where(visible, jnp.maximum(scores, _LOWEST), -jnp.inf))
    top_scores, ids = jax.lax.top_k(ranked, min(cfg.top_k_blocks, num_blocks))
    return jnp.where(top_scores > -jnp.inf, ids, -1).astype(jnp.int32)


def pool_query_blocks(token_block_scores: jax.Array, query_block_size: int) -> jax.Array:
    """Prefill shares one selection per query block: [..., T, NB] -> [..., T/query_block_size, NB] by max."""
    *lead, t, nb = token_block_scores.shape
    return token_block_scores.reshape(*lead, t // query_block_size, query_block_size, nb).max(axis=-2)


def select_for_queries(scores: jax.Array, positions: jax.Array, num_blocks: int, cfg: SparseConfig, *,
                       per_query_block: bool) -> jax.Array:
    """Selector scores [B, KV, T, C] -> block ids [B, KV, T', k].

    Decode selects per token (T' = T); prefill shares one selection per 64-token query block (T' = T / block_size,
    positions block-aligned), scoring each block by its best token.
    """
    token_scores = block_scores(scores, num_blocks, cfg)
    bs = cfg.block_size
    if per_query_block:
        token_scores = pool_query_blocks(token_scores, bs)
        query_block = positions[:, ::bs] // bs
    else:
        query_block = positions // bs
    return select_blocks(token_scores, query_block[:, None, :], cfg)

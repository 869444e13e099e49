"""The SparDA inference engine: one engine, five modes (SPARDA.md §5).

* `dense`, `sparse`, `sparda`: all KV on the GPU; these run the model's own jitted forward (`Transformer.__call__`).
* `sparse-offload`: query selector; layer l's misses are fetched synchronously once layer l's query exists.
* `sparda-offload`: Forecast selector; while layer l's attention and MLP run, layer l+1's misses move (prefetch).

The offload modes drive the model layer by layer through `Block.attention_inputs` / `Block.finish` and the selection
functions of `sparda_jax.selection` (the one implementation of the math). Per layer the device holds a slot pool
[B, KV, cache_slots + 2, S, D] for K and for V (cache slots + two tail slots), and the compressed keys; the host
holds everything (`HostKVStore`). `SlotMap` diffs each selection against the pool, so only misses move.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.host_store import HostKVStore
from infer.programs import check_program_length, multi_step_options
from infer.slots import Plan, SlotMap
from infer.telemetry import LayerStats, StepStats, program_steps
from infer.transfer import HostGatherFetcher
from pallas_kernels.sparse_decode import sparse_decode_attention
from pallas_kernels.sparse_prefill import sparse_prefill_attention
from sparda_jax import selection
from sparda_jax.config import SparseConfig
from sparda_jax.errors import SpardaError
from sparda_jax.model import KVCache, Transformer, rope_frequencies

ENGINE_MODES = ("dense", "sparse", "sparse-offload", "sparda", "sparda-offload")
OFFLOAD_MODES = ("sparse-offload", "sparda-offload")
TRANSFERS = ("host-gather", "zero-copy")
# The fused step: 7-10x the layer-wise host-gather path on the H100 (bench_results/engine/HISTORY.md, "Engine v2
# measured").
DEFAULT_TRANSFER = "zero-copy"

# Steps per resident multi-step program (`ResidentEngine.decode_greedy`): as many as the fused engine's longest.
RESIDENT_PROGRAM_STEPS = 64

# (layer, ids [B, KV, k] numpy, positions [B]) -> ids; benchmarks replace random-weight selections with it.
SelectionOverride = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


def decode_select(scores, positions, num_blocks, sparse: SparseConfig):
    """scores [B, KV, 1, C] of one decode token -> block ids [B, KV, k] (as in `Transformer.__call__`)."""
    return selection.select_for_queries(scores, positions, num_blocks, sparse, per_query_block=False)[:, :, 0]


def batch_tokens(tokens, batch: int):
    """One token per sequence, int32 [B]: a device array stays on the device; anything else becomes numpy."""
    if not isinstance(tokens, jax.Array):
        tokens = np.asarray(tokens, np.int32)
    if tokens.size != batch:
        raise SpardaError(f"decode takes one token per sequence ({batch}), got shape {tokens.shape}")
    return tokens.reshape(batch).astype(np.int32)


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9))
def _front(graphdef, state, x, positions, kc_own, kc_next, selector: str, first: bool, num_blocks: int,
           sparse: SparseConfig):
    """Layer input -> q, k, v; this layer's own selection (query selector, or layer 0's q_select); and, for the
    Forecast, the selection of the next layer (computed here, one layer early)."""
    block = nnx.merge(graphdef.value if isinstance(graphdef, _Static) else graphdef, state)
    inv_freq = rope_frequencies(block.attn.config)
    h, q, k, v = block.attention_inputs(x, positions, inv_freq)
    own = nxt = None
    if selector == "sparse":
        own = decode_select(selection.query_selector_scores(q, kc_own, positions, sparse), positions, num_blocks,
                             sparse)
    else:
        if first:
            f0 = block.attn.selector_query(block.attn.q_select, h, positions, inv_freq)
            own = decode_select(selection.forecast_scores(f0, kc_own, positions, sparse), positions, num_blocks,
                                 sparse)
        if kc_next is not None:
            f = block.attn.selector_query(block.attn.forecast, h, positions, inv_freq)
            nxt = decode_select(selection.forecast_scores(f, kc_next, positions, sparse), positions, num_blocks,
                                 sparse)
    return q, k, v, own, nxt


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _scatter(pool_k, pool_v, staged, dst):
    """Fetched rows [M, 2*S*D] into their slots; padding rows (dst_b out of range) are dropped. Its own small jit,
    so each miss-count bucket recompiles only this."""
    _, _, _, s, d = pool_k.shape
    dst_b, dst_g, dst_s = dst[0], dst[1], dst[2]
    rows = staged.reshape(-1, 2, s, d).astype(pool_k.dtype)
    pool_k = pool_k.at[dst_b, dst_g, dst_s].set(rows[:, 0], mode="drop")
    pool_v = pool_v.at[dst_b, dst_g, dst_s].set(rows[:, 1], mode="drop")
    return pool_k, pool_v


def append_token(pool_k, pool_v, kc, k, v, positions, cache_slots: int, sparse: SparseConfig):
    """Append the new token (k, v [B, KV, 1, D]) at positions [B] to its tail slot (cache_slots + block % 2) and
    refresh the compressed key it completes. Shared by the layer-wise and the fused engines."""
    b, kvh, pslots, s, d = pool_k.shape
    tail = cache_slots + (positions // s) % 2
    bi = jnp.arange(b)
    pool_k = pool_k.at[bi, :, tail, positions % s].set(k[:, :, 0].astype(pool_k.dtype))
    pool_v = pool_v.at[bi, :, tail, positions % s].set(v[:, :, 0].astype(pool_v.dtype))

    def refresh(pk_b, kc_b, p):
        # The compressed key completed by token p lies in the two newest blocks, i.e. in the tail slots.
        b0 = jnp.maximum(p // s - 1, 0)
        window = jnp.concatenate([pk_b[:, cache_slots + b0 % 2], pk_b[:, cache_slots + (b0 + 1) % 2]], axis=1)
        index, value = selection.latest_compressed_key(window, p - b0 * s, sparse)
        index = index + b0 * (s // sparse.compress_stride)
        return jax.lax.dynamic_update_slice_in_dim(kc_b, value[:, None].astype(kc_b.dtype), index, axis=1)

    return pool_k, pool_v, jax.vmap(refresh)(pool_k, kc, positions)


@functools.partial(jax.jit, static_argnums=(0, 11), donate_argnums=(6, 7, 8))
def _back(graphdef, state, x, q, k, v, pool_k, pool_v, kc, slots, positions, sparse: SparseConfig):
    """Append the new token to its tail slot, refresh the compressed key it completes, attend over the listed
    slots, then the residual + MLP."""
    block = nnx.merge(graphdef.value if isinstance(graphdef, _Static) else graphdef, state)
    slot_ids, slot_lengths = slots[0], slots[1]  # one host->device copy for both
    pool_k, pool_v, kc = append_token(pool_k, pool_v, kc, k, v, positions[:, 0], pool_k.shape[2] - 2, sparse)
    attn = sparse_decode_attention(q[:, :, :, 0], pool_k, pool_v, slot_ids, slot_lengths)
    x = block.finish(x, attn[:, :, :, None])
    return x, pool_k, pool_v, kc


@functools.partial(jax.jit, static_argnums=(0, 9, 10))
def _prefill_layer_chunk(graphdef, state, x, positions, k_buf, v_buf, sel_q, kv_len, start, selector: str,
                         sparse: SparseConfig):
    """One prefill chunk of one layer against that layer's device KV buffer [B, KV, T, D] (as the model's prefill)."""
    block = nnx.merge(graphdef.value if isinstance(graphdef, _Static) else graphdef, state)
    inv_freq = rope_frequencies(block.attn.config)
    bs = sparse.block_size
    h, q, k, v = block.attention_inputs(x, positions, inv_freq)
    k_buf = jax.lax.dynamic_update_slice_in_dim(k_buf, k.astype(k_buf.dtype), start, axis=2)
    v_buf = jax.lax.dynamic_update_slice_in_dim(v_buf, v.astype(v_buf.dtype), start, axis=2)
    kc = selection.compress_keys(k_buf, sparse)
    if kc.shape[2] == 0:
        kc = jnp.zeros((*k_buf.shape[:2], 1, k_buf.shape[3]), k_buf.dtype)
    num_blocks = k_buf.shape[2] // bs
    if selector == "sparse":
        scores = selection.query_selector_scores(q, kc, positions, sparse)
    else:
        if sel_q is None:  # layer 0 selects its own blocks with q_select
            sel_q = block.attn.selector_query(block.attn.q_select, h, positions, inv_freq)
        scores = selection.forecast_scores(sel_q, kc, positions, sparse)
    block_ids = selection.select_for_queries(scores, positions, num_blocks, sparse, per_query_block=True)
    attn = sparse_prefill_attention(q, k_buf, v_buf, block_ids, kv_len, q_start=start)
    x = block.finish(x, attn)
    f = block.attn.selector_query(block.attn.forecast, h, positions, inv_freq) if selector == "sparda" else None
    return x, k_buf, v_buf, f


@functools.partial(jax.jit, static_argnums=(0,))
def _embed(graphdef, state, tokens):
    return nnx.merge(graphdef.value, state).embed[...][tokens]


@functools.partial(jax.jit, static_argnums=(0,))
def _logits(graphdef, state, x):
    return nnx.merge(graphdef.value, state).logits(x)


def _split_top(model: Transformer):
    """The model without its layers (embedding, final norm, head), so per-step calls do not flatten 32 layers."""
    shell = copy.copy(model)  # shares the Variables; only the layer list differs
    shell.layers = nnx.List([])
    graphdef, state = nnx.split(shell)
    return _Static(graphdef), state


class _Static:
    """A static jit argument hashed by identity: avoids re-hashing an NNX GraphDef on every per-layer call."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


def _dedupe_graphdefs(splits):
    unique: list = []
    out = []
    for gd, st in splits:
        match = next((u for u in unique if u.value == gd), None)
        if match is None:
            match = _Static(gd)
            unique.append(match)
        out.append((match, st))
    return out


def committed(tree):
    """`tree` committed to the device. jit keys its cache on whether each argument is committed, so a step fed fresh
    arrays (uncommitted) first and committed ones later (its own outputs once any input was committed, a pinned
    host view, a user's device tokens) compiles again: the fused step compiled three times per benchmark run, ~23 s
    each (H200, paper 8B shape). No copy for arrays already there."""
    return jax.device_put(tree, jax.devices()[0])


# HBM an auto-sized block cache leaves free, as a fraction of the device's limit: decode activations, the step's
# temporaries and the allocator's fragmentation.
CACHE_RESERVE_FRACTION = 0.1


def free_device_bytes() -> int | None:
    """Device memory a block cache may take now (limit - in use - reserve), or None where the device reports none
    (the CPU backend)."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    limit = stats["bytes_limit"]
    return max(0, int(limit - stats.get("bytes_in_use", 0) - CACHE_RESERVE_FRACTION * limit))


def cache_slots_for_memory(config, sparse: SparseConfig, batch: int, num_blocks: int, itemsize: int,
                           budget_bytes: float) -> int:
    """The most device slots per (sequence, KV head) whose K and V pools over all layers fit `budget_bytes`, never
    fewer than top_k (the pool the step needs) nor more than the context's blocks (which hold every block)."""
    slot_bytes = config.num_layers * batch * config.num_kv_heads * 2 * sparse.block_size * config.head_dim * itemsize
    return int(min(num_blocks, max(sparse.top_k_blocks, budget_bytes // slot_bytes)))


class OffloadEngine:
    """Batched decode with the KV in host memory. `prefill` then `decode` repeatedly; `stats` holds telemetry.

    cache_slots: device slots per (sequence, KV head) besides the two tail slots; default top_k (the paper's pool);
    more slots make an LRU block cache; "auto" sizes it from `cache_memory_gb`, or else from the device memory free
    now less a reserve (`free_device_bytes`; top_k where the device reports no memory). transfer: 'host-gather'
    (prefetch thread + staging + device_put) or 'zero-copy' (Pallas kernel reading pinned host memory).
    """

    def __init__(self, model: Transformer, sparse: SparseConfig, *, mode: str, batch: int, max_len: int,
                 cache_slots: int | str | None = None, cache_memory_gb: float | None = None,
                 transfer: str = "host-gather", host_memory_gb: float | None = None,
                 gather_threads: int = 8, prefill_chunk: int = 1024, staging: str = "auto",
                 selection_override: SelectionOverride | None = None, pin: bool | None = None,
                 store: HostKVStore | None = None):
        if mode not in OFFLOAD_MODES:
            raise SpardaError(f"OffloadEngine mode must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")
        if transfer not in TRANSFERS:
            raise SpardaError(f"unknown transfer path {transfer!r} (choose from {', '.join(TRANSFERS)})")
        bs = sparse.block_size
        if sparse.compress_kernel > bs:
            raise SpardaError("the offload engine needs compress_kernel <= block_size")
        if max_len % bs:
            raise SpardaError(f"max_len {max_len} must be a multiple of the block size {bs}")
        self.config = c = model.config
        self.sparse, self.mode, self.batch, self.max_len = sparse, mode, batch, max_len
        self.selector = "sparse" if mode == "sparse-offload" else "sparda"
        self.prefill_chunk = max(bs, prefill_chunk // bs * bs)
        self.dtype = model.dtype
        self.num_blocks = max_len // bs
        if cache_memory_gb is not None and cache_slots != "auto":
            raise SpardaError('cache_memory_gb sizes cache_slots="auto" only')
        if cache_memory_gb is not None and not cache_memory_gb > 0:
            raise SpardaError(f"cache_memory_gb must be > 0, got {cache_memory_gb}")
        if cache_slots == "auto":
            budget = round(cache_memory_gb * 1e9) if cache_memory_gb is not None else free_device_bytes()
            cache_slots = sparse.top_k_blocks if budget is None else cache_slots_for_memory(
                c, sparse, batch, self.num_blocks, jnp.dtype(model.dtype).itemsize, budget)
        elif not (cache_slots is None or isinstance(cache_slots, (int, np.integer)) and cache_slots >= 1):
            raise SpardaError(f'cache_slots must be a positive number of slots or "auto", got {cache_slots!r}')
        self.cache_slots = max(cache_slots or sparse.top_k_blocks, sparse.top_k_blocks)
        self.selection_override = selection_override
        # Budget check first: nothing is allocated when the KV cannot fit.
        if store is not None:  # benchmarks: a view of a larger, already filled store
            if store.num_blocks != max_len // bs or store.num_layers != c.num_layers:
                raise SpardaError("the given host store does not match the engine's shape")
            self.store = store.view(batch)
        else:
            self.store = HostKVStore(c.num_layers, batch, c.num_kv_heads, max_len, bs, c.head_dim, model.dtype,
                                     host_memory_gb=host_memory_gb, pin=pin)
        splits = _dedupe_graphdefs([nnx.split(layer) for layer in model.layers])
        self.layers = [(graphdef, committed(state)) for graphdef, state in splits]
        graphdef, top_state = _split_top(model)
        self.top = graphdef, committed(top_state)
        self.maps = [SlotMap(batch, c.num_kv_heads, self.num_blocks, self.cache_slots, bs) for _ in range(c.num_layers)]
        pool_shape = (batch, c.num_kv_heads, self.cache_slots + 2, bs, c.head_dim)
        self.pool_k = committed([jnp.zeros(pool_shape, self.dtype) for _ in range(c.num_layers)])
        self.pool_v = committed([jnp.zeros(pool_shape, self.dtype) for _ in range(c.num_layers)])
        self.c_max = max(selection.num_compressed_keys(max_len, sparse), 1)
        kc_shape = (batch, c.num_kv_heads, self.c_max, c.head_dim)
        self.kc = committed([jnp.zeros(kc_shape, self.dtype) for _ in range(c.num_layers)])
        self.lengths = np.zeros(batch, np.int64)
        max_rows = batch * c.num_kv_heads * sparse.top_k_blocks
        self.transfer = transfer
        # 'zero-copy' is the fused engine (infer.fused), which moves blocks inside its jitted step.
        self.fetcher = (HostGatherFetcher(self.store, max_rows, threads=gather_threads, staging=staging)
                        if transfer == "host-gather" else None)
        self.stats: list[StepStats] = []
        self._steps = 0
        self._closed = False

    # ------------------------------------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.fetcher is not None:
                self.fetcher.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------------ prefill
    def prefill(self, tokens: np.ndarray, lengths: np.ndarray | None = None) -> jax.Array:
        """tokens [B, T] (T a multiple of the block size, right-padded), lengths [B] real tokens.
        Chunked, layer by layer; each layer's KV goes to the host store. Returns logits [B, V] at the last real
        token."""
        tokens = np.asarray(tokens, np.int32)
        b, t = tokens.shape
        bs, c = self.sparse.block_size, self.config
        if b != self.batch or t % bs or t > self.max_len:
            raise SpardaError(f"prefill tokens {tokens.shape} do not fit batch {self.batch}, block {bs}, "
                              f"context {self.max_len}")
        lengths = np.full(b, t, np.int64) if lengths is None else np.asarray(lengths, np.int64)
        t0 = time.perf_counter()
        for m in self.maps:
            m.reset()
        chunk = min(self.prefill_chunk, t)
        starts = list(range(0, t, chunk))
        xs = [_embed(*self.top, jnp.asarray(tokens[:, s0:s0 + chunk])) for s0 in starts]
        pos = [jnp.asarray(np.broadcast_to(np.arange(s0, min(s0 + chunk, t), dtype=np.int32), (b, min(chunk, t - s0))))
               for s0 in starts]
        kv_len = jnp.asarray(lengths.astype(np.int32))
        sel = [None] * len(starts)
        writes: list[cf.Future] = []
        with cf.ThreadPoolExecutor(1, thread_name_prefix="sparda-kv-writer") as writer:
            for layer, (gd, st) in enumerate(self.layers):
                shape = (b, c.num_kv_heads, t, c.head_dim)
                k_buf, v_buf = jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)
                for i, s0 in enumerate(starts):
                    xs[i], k_buf, v_buf, sel[i] = _prefill_layer_chunk(
                        gd, st, xs[i], pos[i], k_buf, v_buf, sel[i], kv_len, jnp.int32(s0), self.selector,
                        self.sparse)
                kc = selection.compress_keys(k_buf, self.sparse)
                self.kc[layer] = jnp.zeros_like(self.kc[layer]).at[:, :, :kc.shape[2]].set(kc[:, :, :self.c_max])
                writes.append(writer.submit(self._write_layer, layer, k_buf, v_buf))
            for w in writes:
                w.result()
        self.lengths = lengths.copy()
        self._load_tails(range(b))
        last = jnp.asarray(lengths - 1)
        x_last = jnp.concatenate(xs, axis=1)[jnp.arange(b), last]
        logits = _logits(*self.top, x_last)
        logits.block_until_ready()
        self.stats.append(StepStats(self._steps, "prefill", time.perf_counter() - t0))
        self._steps += 1
        return logits

    def _write_layer(self, layer: int, k_buf: jax.Array, v_buf: jax.Array) -> None:
        self.store.write_tokens(layer, np.asarray(k_buf), np.asarray(v_buf), 0)

    def _load_tails(self, seqs) -> None:
        """Fill each sequence's two tail slots (blocks cur-1 and cur) from the host store, all layers."""
        s = self.sparse.block_size
        for layer in range(self.config.num_layers):
            host = self.store.layer(layer)
            tails = np.zeros((self.batch, self.config.num_kv_heads, 2, 2, s, self.config.head_dim), self.store.dtype)
            for b in seqs:
                cur = int(self.lengths[b]) // s
                for j in (cur - 1, cur):
                    if 0 <= j < self.num_blocks:
                        tails[b, :, j % 2] = host[b, :, j]
            tails = jnp.asarray(tails)
            self.pool_k[layer] = self.pool_k[layer].at[:, :, self.cache_slots:].set(tails[:, :, :, 0])
            self.pool_v[layer] = self.pool_v[layer].at[:, :, self.cache_slots:].set(tails[:, :, :, 1])

    # ------------------------------------------------------------------------------------------------ decode
    def _ids(self, ids: jax.Array, layer: int, positions: np.ndarray) -> np.ndarray:
        out = np.asarray(ids)
        if self.selection_override is not None:
            out = np.asarray(self.selection_override(layer, out, positions), np.int32)
        return out

    def _plan_rows(self, layer: int, ids: np.ndarray, positions: np.ndarray):
        plan = self.maps[layer].plan(ids, positions)
        rows = self.store.row_ids(plan.miss_b, plan.miss_kv, plan.miss_block)
        return plan, rows

    def _device_plan(self, plan: Plan, staged):
        m = plan.misses
        mp = 0 if staged is None else staged.shape[0]
        dst = np.zeros((3, mp), np.int32)
        dst[0] = self.batch  # padding rows land out of range and are dropped
        dst[0, :m], dst[1, :m], dst[2, :m] = plan.miss_b, plan.miss_kv, plan.miss_slot
        return jnp.asarray(dst)

    def _decode_inputs(self, tokens) -> tuple[Any, np.ndarray]:
        """Checks that a decode step can run; returns the tokens [B] and each sequence's position [B]. A device
        array of tokens stays on the device (reading it here would stall a pipelined loop)."""
        if self._closed:
            raise SpardaError("the engine is closed")
        positions = self.lengths.copy()
        if int(positions.max()) >= self.max_len:
            raise SpardaError(f"context {self.max_len} is full")
        return batch_tokens(tokens, self.batch), positions

    def decode(self, tokens, *, block: bool = True) -> jax.Array:
        """One token per sequence, appended at each sequence's own length. Returns logits [B, V]. `block` is for
        API parity with the pipelined engines: this one reads every layer's selection on the host, so it waits."""
        tokens, positions_np = self._decode_inputs(tokens)
        t0 = time.perf_counter()
        positions = jnp.asarray(positions_np[:, None].astype(np.int32))
        x = _embed(*self.top, committed(tokens)[:, None])
        num_layers = self.config.num_layers
        step = StepStats(self._steps, "decode")
        pending = None
        for layer, (gd, st) in enumerate(self.layers):
            kc_next = self.kc[layer + 1] if self.selector == "sparda" and layer + 1 < num_layers else None
            q, k, v, own, nxt = _front(gd, st, x, positions, self.kc[layer], kc_next, self.selector, layer == 0,
                                       self.num_blocks, self.sparse)
            ls = LayerStats(layer)
            tw = time.perf_counter()
            if own is not None:  # selection known only now: fetch synchronously
                plan, rows = self._plan_rows(layer, self._ids(own, layer, positions_np), positions_np)
                staged, rec = self.fetcher.fetch(layer, rows)
            else:
                plan, future = pending
                staged, rec = future.result()  # re-raises a prefetch failure here, in the caller's thread
            ls.wait_s = time.perf_counter() - tw
            ls.hits, ls.tail_hits, ls.misses = plan.hits, plan.tail_hits, plan.misses
            ls.bytes, ls.gather_s, ls.copy_s = rec.bytes, rec.gather_s, rec.copy_s
            step.layers.append(ls)
            if staged is not None:
                self.pool_k[layer], self.pool_v[layer] = _scatter(self.pool_k[layer], self.pool_v[layer], staged,
                                                                  self._device_plan(plan, staged))
            x, self.pool_k[layer], self.pool_v[layer], self.kc[layer] = _back(
                gd, st, x, q, k, v, self.pool_k[layer], self.pool_v[layer], self.kc[layer],
                jnp.asarray(np.stack([plan.slot_ids, plan.slot_lengths])), positions, self.sparse)
            if nxt is not None:  # Forecast: layer+1's misses start moving now, while this layer computes
                plan_n, rows_n = self._plan_rows(layer + 1, self._ids(nxt, layer + 1, positions_np), positions_np)
                pending = (plan_n, self.fetcher.submit(layer + 1, rows_n))
        logits = _logits(*self.top, x[:, 0])
        logits.block_until_ready()
        self.lengths = positions_np + 1
        self._flush_completed(positions_np)
        step.seconds = step.dispatch_s = time.perf_counter() - t0  # the host works through the whole step
        self.stats.append(step)
        self._steps += 1
        return logits

    def _flush_completed(self, positions: np.ndarray) -> None:
        """A block completed by this step moves to the host store before its tail slot is reused."""
        s = self.sparse.block_size
        for b in np.nonzero(positions % s == s - 1)[0]:
            blk = int(positions[b]) // s
            slot = (self.cache_slots + blk % 2,)
            seq = jnp.asarray([b], jnp.int32)
            self.store.data[:, b, :, blk, 0] = np.asarray(tail_rows(self.pool_k, slot, seq))[:, 0]
            self.store.data[:, b, :, blk, 1] = np.asarray(tail_rows(self.pool_v, slot, seq))[:, 0]

    # ------------------------------------------------------------------------------------------------ benchmarks
    def fill_synthetic(self, length: int, seed: int = 0, fill_store: bool = True) -> None:
        """Benchmarks: pretend `length` tokens were prefilled (non-zero pseudo-random KV, no model run)."""
        if fill_store:
            self.store.fill(seed)
        key = jax.random.key(seed)
        for layer in range(self.config.num_layers):
            self.kc[layer] = jax.random.normal(jax.random.fold_in(key, layer), self.kc[layer].shape, self.dtype)
            self.maps[layer].reset()
        self.kc = committed(self.kc)
        self.lengths = np.full(self.batch, length, np.int64)
        self._load_tails(range(self.batch))


@functools.partial(jax.jit, static_argnums=(1,))
def tail_rows(pools, slots: tuple, seqs):
    """[L, n, KV, S, D]: tail slot slots[i] of sequence seqs[i], in every layer's pool."""
    return jnp.stack([jnp.stack([p[b, :, s] for b, s in zip(seqs, slots)]) for p in pools])


class ResidentEngine:
    """`dense`, `sparse`, `sparda`: the whole KV on the GPU, through `Transformer.__call__` (jitted)."""

    def __init__(self, model: Transformer, sparse: SparseConfig, *, mode: str, batch: int, max_len: int):
        if mode not in ("dense", "sparse", "sparda"):
            raise SpardaError(f"ResidentEngine mode must be dense, sparse or sparda, got {mode!r}")
        self.config, self.sparse, self.mode, self.batch, self.max_len = model.config, sparse, mode, batch, max_len
        self.dtype = model.dtype
        graphdef, state = nnx.split(model)
        # Flattened once: an nnx.State is flattened in Python, Variable by Variable, on every call otherwise.
        params, params_tree = jax.tree.flatten(state)
        self._params = committed(params)
        self.cache = committed(KVCache.create(model.config, sparse, batch, max_len, model.dtype))

        def run(params, tokens, cache, lengths):
            model = nnx.merge(graphdef, jax.tree.unflatten(params_tree, params))
            return model(tokens, cache, mode=mode, sparse=sparse, lengths=lengths)

        def greedy_steps(params, tokens, cache, num_steps):
            model = nnx.merge(graphdef, jax.tree.unflatten(params_tree, params))

            def body(i, carry):
                tokens, cache, out = carry
                logits, cache = model(tokens[:, None], cache, mode=mode, sparse=sparse)
                tokens = jnp.argmax(logits, -1).astype(jnp.int32)
                return tokens, cache, out.at[i].set(tokens)

            out = jnp.full((RESIDENT_PROGRAM_STEPS, batch), -1, jnp.int32)
            _, cache, out = jax.lax.fori_loop(0, num_steps, body, (tokens, cache, out))
            return out, cache

        self._run = jax.jit(run, donate_argnums=(2,))
        self._greedy = jax.jit(greedy_steps, donate_argnums=(2,),
                               compiler_options=multi_step_options({}, jax.default_backend() == "gpu") or None)
        self.stats: list[StepStats] = []
        self._steps = 0

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray | None = None) -> jax.Array:
        tokens = np.asarray(tokens, np.int32)
        lengths = np.full(tokens.shape[0], tokens.shape[1]) if lengths is None else np.asarray(lengths)
        return self._timed("prefill", tokens, lengths.astype(np.int32))

    def decode(self, tokens, *, block: bool = True) -> jax.Array:
        """block=False returns at once (the step runs asynchronously): feed the next step device-side tokens and
        the host's dispatch overlaps the GPU's step."""
        return self._timed("decode", batch_tokens(tokens, self.batch)[:, None], None, block)

    def decode_greedy(self, tokens, num_steps: int) -> np.ndarray:
        """`num_steps` greedy tokens per sequence, [num_steps, B] (waits for them): programs of up to
        RESIDENT_PROGRAM_STEPS steps, each a loop inside one jit, as the fused offload engine's `decode_greedy` (the
        like-for-like resident timing for its multi-step programs)."""
        check_program_length(num_steps, int(np.asarray(self.cache.lengths).max()), self.max_len)
        tokens = committed(batch_tokens(tokens, self.batch))
        outs = []
        for done in range(0, num_steps, RESIDENT_PROGRAM_STEPS):
            count = min(RESIDENT_PROGRAM_STEPS, num_steps - done)
            t0 = time.perf_counter()
            out, self.cache = self._greedy(self._params, tokens, self.cache, np.int32(count))
            self.stats += program_steps(self._steps, count, (time.perf_counter() - t0) / count)
            self._steps += count
            tokens = out[count - 1]
            outs.append((out, count))
        return np.concatenate([np.asarray(out)[:n] for out, n in outs])

    def _timed(self, kind, tokens, lengths, block=True):
        t0 = time.perf_counter()
        logits, self.cache = self._run(self._params, committed(tokens), self.cache,
                                       None if lengths is None else committed(lengths))
        step = StepStats(self._steps, kind, float("nan"), dispatch_s=time.perf_counter() - t0)
        if block:
            logits.block_until_ready()
            step.seconds = time.perf_counter() - t0
        self.stats.append(step)
        self._steps += 1
        return logits

    def fill_synthetic(self, length: int, seed: int = 0) -> None:
        key = jax.random.key(seed)
        c = self.cache
        specs = [[(x.shape, x.dtype) for x in xs] for xs in (c.k, c.v, c.kc)]
        lengths = jnp.full_like(c.lengths, length)
        # Drop the zero cache first: holding it while the random one is built needs twice the KV in HBM, which hung
        # resident B=36 at 32K (paper 8B shape, H100) in the allocator's retry loop.
        self.cache = c = None
        rnd = [[jax.random.normal(jax.random.fold_in(key, 100 * j + i), shape, dtype)
                for i, (shape, dtype) in enumerate(spec)] for j, spec in enumerate(specs)]
        self.cache = committed(KVCache(*rnd, lengths))

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_engine(model: Transformer, sparse: SparseConfig, mode: str, *, batch: int, max_len: int, **kwargs: Any):
    if mode not in ENGINE_MODES:
        raise SpardaError(f"unknown engine mode {mode!r} (choose from {', '.join(ENGINE_MODES)})")
    if mode in OFFLOAD_MODES:
        if kwargs.get("transfer", DEFAULT_TRANSFER) == "zero-copy":
            from infer.fused import FusedOffloadEngine

            kwargs.pop("transfer", None)
            return FusedOffloadEngine(model, sparse, mode=mode, batch=batch, max_len=max_len, **kwargs)
        kwargs.setdefault("transfer", DEFAULT_TRANSFER)
        return OffloadEngine(model, sparse, mode=mode, batch=batch, max_len=max_len, **kwargs)
    return ResidentEngine(model, sparse, mode=mode, batch=batch, max_len=max_len)

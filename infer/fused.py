"""Engine v2: the whole offload decode step as ONE jitted, device-resident program (transfer path `zero-copy`).

Per layer the device holds the slot pool (K and V [B, KV, P + 2, S, D]: P cache slots plus the two tail slots), the
slot map `slot_block` [B, KV, P] (block held by each slot, -1 = free), the LRU ages `age` [B, KV, P] (step of last
use, -1 = free) and the compressed keys; the state also holds each sequence's position. One `jax.jit` per decode
step runs all layers (a Python `for` inside the jit; the device state is donated). `decode(tokens, block=False)`
returns before the step runs: fed device-side tokens, the host enqueues step t+1 while the GPU runs step t (the
enqueue took 4.4 ms a step at 32K B=1 on the H200, 2.6 ms of it XLA re-recording the step's 1313-command CUDA
graph, as 2-3 of the buffers it touches move every step (bench_results/engine/h200_2026-12-02_graph_updates); a
blocking loop leaves the GPU idle for all of it). `decode_greedy(tokens, n)` runs up to 64 greedy steps as one
program, a loop inside one CUDA graph, so the host enqueues once per program (`decode_sampled`: the same with a
sampler). Per layer:

  selection (the model's own functions) -> diff against the slot map on the device (membership of the k selected ids
  among the P slots) -> misses take victim slots (slots not used this step, free first, then least recently used:
  the same rule as `infer.slots.SlotMap`) -> `fill_slots` (Pallas, zero-copy) reads only the missed rows of the
  `pinned_host` store straight into their slots -> tail append + compressed-key refresh -> block-sparse attention
  over the pool -> residual + MLP.

`sparda-offload`: layer l+1's Forecast selection, diff and fill are issued at layer l, before layer l's attention
and MLP (optionally on a second stream, `stream=True`); the fill's index arrays are held live to the end of layer l,
so that in a CONCURRENT CUDA graph no buffer reuse makes layer l wait for it. `sparse-offload`: layer l's own
selection, then its fill.
`fill_kernel`: "grid" (one program per selected block and piece) or "persistent" (a few programs loop over the
compacted misses, leaving the other SMs to the compute beside them); "auto" (the default) takes persistent for the
prefetch of `sparda-offload` and grid for the fill `sparse-offload` waits for.

Hit / tail-hit / miss counts come back as one small [L, 3] device array per step, read lazily (no per-layer sync).
Completed blocks reach the host store outside the step: a block completed at position 64j+63 stays in tail slot
j % 2 until the sequence enters block j + 2, so just before that step one batched device->host copy (all layers)
writes it to the store. With equal lengths that is one copy every 64 steps.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.engine import OffloadEngine, append_token, committed, decode_select, tail_rows
from infer.programs import check_program_length, multi_step_options
from infer.telemetry import StepStats, program_steps
from infer.zero_copy import compact_misses, fill_slots, fill_slots_persistent, host_arrays
from pallas_kernels.sparse_decode import sparse_decode_attention
from sparda_jax import selection
from sparda_jax.config import SparseConfig
from sparda_jax.errors import SpardaError
from sparda_jax.model import rope_frequencies
from sparda_jax.sampling import SamplingConfig, sample

# (layer, ids [B, KV, k], positions [B], hook state) -> (ids, hook state), traced inside the step (benchmarks).
DeviceSelectionHook = Callable[[int, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def slot_diff(ids, positions, slot_block, age, clock, block_slot=None, *, num_blocks: int, block_size: int):
    """Diff a selection against one layer's slot map, on the device.

    ids [B, KV, k] (-1 = none); positions [B]; slot_block, age [B, KV, P]; clock: this step's stamp. block_slot
    [B, KV, num_blocks] (slot holding each block, -1 = none), or None: membership then compares the k ids with all
    P slots ([k, P] per row, three reductions), where with the table it is one gather of k entries (the `table`
    lookup, meant for pools much larger than k).
    Returns slot_ids, slot_lengths [B, KV, k] for the attention, src (host row or -1) and dst (flat pool slot)
    [B, KV, k] for the fill, the updated slot_block, age and block_slot, and counts [3] = (hits, tail hits, misses).
    """
    b, kvh, k = ids.shape
    p = slot_block.shape[-1]
    s = block_size
    bi = jnp.arange(b)[:, None, None]
    gi = jnp.arange(kvh)[None, :, None]
    cur = (positions // s)[:, None, None]
    valid = ids >= 0
    tail = valid & (ids >= cur - 1)
    need = valid & ~tail
    if block_slot is None:
        eq = (slot_block[:, :, None, :] == ids[:, :, :, None]) & need[..., None]  # [B, KV, k, P]
        hit = eq.any(-1)
        hit_slot = jnp.argmax(eq, axis=-1).astype(jnp.int32)
        used = eq.any(2)  # [B, KV, P] slots hit now: never victims this step
    else:
        # The table is a hint: an evicted block's entry is left behind, so a hit also needs the slot to hold it.
        hit_slot = jnp.take_along_axis(block_slot, jnp.clip(ids, 0, num_blocks - 1), axis=-1)
        held = jnp.take_along_axis(slot_block, jnp.clip(hit_slot, 0, p - 1), axis=-1)
        hit = need & (hit_slot >= 0) & (held == ids)
        used = jnp.zeros((b, kvh, p), bool).at[bi, gi, jnp.where(hit, hit_slot, p)].set(True, mode="drop")
    miss = need & ~hit
    stamped = jnp.where(used, clock, age)
    order = jnp.argsort(stamped, axis=-1, stable=True).astype(jnp.int32)  # free (-1) first, then least recent
    rank = jnp.cumsum(miss, axis=-1) - 1
    new_slot = jnp.take_along_axis(order, jnp.clip(rank, 0, p - 1), axis=-1)
    target = jnp.where(miss, new_slot, p)  # out of range = dropped
    if block_slot is not None:
        block_slot = block_slot.at[bi, gi, jnp.where(miss, ids, num_blocks)].set(new_slot, mode="drop")
    # Evict: the blocks formerly in the victim slots are simply overwritten in slot_block.
    slot_block = slot_block.at[bi, gi, target].set(ids, mode="drop")
    age = stamped.at[bi, gi, target].set(clock, mode="drop")
    slot = jnp.where(miss, new_slot, jnp.where(hit, hit_slot, -1))
    slot = jnp.where(tail, p + ids % 2, slot).astype(jnp.int32)
    kv_len = (positions + 1)[:, None, None]
    lengths = jnp.where(valid, jnp.clip(kv_len - ids * s, 0, s), 0).astype(jnp.int32)
    src = jnp.where(miss, (bi * kvh + gi) * num_blocks + ids, -1).astype(jnp.int32)
    dst = jnp.where(miss, (bi * kvh + gi) * (p + 2) + new_slot, -1).astype(jnp.int32)
    counts = jnp.stack([hit.sum(), tail.sum(), miss.sum()]).astype(jnp.int32)
    return slot, lengths, src, dst, slot_block, age, block_slot, counts


SLOT_LOOKUPS = ("compare", "table")
FILL_KERNELS = ("grid", "persistent")
# "auto": the prefetch runs beside layer l's compute, where few programs leave it the SMs (H200, 2026-12-04, held
# inputs, persistent against grid: 32K B=8 1054.6 against 877.3 tok/s, with the 4k-slot table 1442.1 against
# 1411.3, 128K B=8 974.8 against 850.6, 32K B=1 186.5 against 185.9); sparse-offload's fill has nothing beside it.
AUTO_FILL_KERNEL = {"sparda": "persistent", "sparse": "grid"}
DEFAULT_FILL_PROGRAMS = 32  # the persistent fill's programs (16, 32 and 64 alike: H200, 32K B=8, 2026-12-04)
# XLA's order for the commands of the step's CUDA graph (`xla_gpu_command_buffer_scheduling_mode`): "LHS" (XLA's
# default) follows the schedule on one stream; "CONCURRENT" links commands only where their buffers conflict, meant
# to let layer l+1's fills (they write only layer l+1's pool) run beside layer l's attention and MLP. Measured (H200,
# 32K B=8): for a single step it overlaps 6.4 ms but the enqueue grows to 14 ms, 537 against 700 tok/s with LHS;
# inside a multi-step program the enqueue is paid once per program and CONCURRENT wins (H200, 2026-12-03, greedy,
# 4k-slot table cache: 32K B=1 162.2 against 145.9 tok/s, 32K B=8 1164.6 against 1069.3, 128K B=8 1080.1 against
# 967.6), so the programs use it unless told otherwise.
GRAPH_SCHEDULING = ("LHS", "CONCURRENT")


def _fused_step(graphdef, params_tree, params, state, tokens, hosts, *, selector: str,
                sparse: SparseConfig, num_blocks: int, interpret: bool, stream: bool, fetch: bool, fill_kernel: str,
                fill_programs: int, keep_fill_inputs: bool, hook: DeviceSelectionHook | None):
    model = nnx.merge(graphdef, jax.tree.unflatten(params_tree, params))
    c = model.config
    inv_freq = rope_frequencies(c)
    # The positions live in the donated state, as the resident model's cache lengths do: a fresh positions buffer
    # every step changes an input address of nearly every kernel, and XLA then re-records the step's CUDA graph
    # (measured: ~2 ms of host time a step, H200).
    positions = state["positions"]
    pos2 = positions[:, None]
    num_layers = len(model.layers)
    pk, pv, kc = list(state["pool_k"]), list(state["pool_v"]), list(state["kc"])
    sb, age = list(state["slot_block"]), list(state["age"])
    table = list(state["block_slot"]) if state["block_slot"] is not None else [None] * len(sb)
    hook_state = state["hook"]
    clock = state["clock"] + 1
    counts = [None] * num_layers

    def fill(layer, src, dst):
        src, dst = src.reshape(-1), dst.reshape(-1)
        if fill_kernel == "persistent":
            # The compaction stays outside the second-stream region: with it inside, XLA failed to give the region
            # a stream ("No ExecutionStreamId found for %call-start", H200, jax 0.11.2), where the grid kernel alone
            # ran on gpu_stream:1 (H100, same jax).
            args = compact_misses(src, dst)
            run = functools.partial(fill_slots_persistent, num_programs=fill_programs, interpret=interpret)
        else:
            args = (src, dst)
            run = functools.partial(fill_slots, interpret=interpret)
        if stream:
            from jax.experimental.compute_on import compute_on

            run = compute_on(compute_type="gpu_stream:1",
                             out_memory_spaces=(jax.memory.Space.Device, jax.memory.Space.Device))(run)
        pk[layer], pv[layer] = run(hosts[layer], *args, pk[layer], pv[layer])
        return args

    def plan(layer, scores):
        nonlocal hook_state
        ids = decode_select(scores, pos2, num_blocks, sparse)
        if hook is not None:
            ids, hook_state = hook(layer, ids, positions, hook_state)
        slot, lengths, src, dst, sb[layer], age[layer], table[layer], counts[layer] = slot_diff(
            ids, positions, sb[layer], age[layer], clock, table[layer], num_blocks=num_blocks,
            block_size=sparse.block_size)
        return (slot, lengths), fill(layer, src, dst) if fetch else None

    x = model.embed[...][tokens[:, None]]
    pending = None
    for layer, block in enumerate(model.layers):
        h, q, k, v = block.attention_inputs(x, pos2, inv_freq)
        prefetch_args = None
        if selector == "sparse":
            own, _ = plan(layer, selection.query_selector_scores(q, kc[layer], pos2, sparse))
        else:
            if layer == 0:
                f0 = block.attn.selector_query(block.attn.q_select, h, pos2, inv_freq)
                pending, _ = plan(0, selection.forecast_scores(f0, kc[0], pos2, sparse))
            own = pending
            if layer + 1 < num_layers:  # issued before this layer's attention and MLP
                f = block.attn.selector_query(block.attn.forecast, h, pos2, inv_freq)
                pending, prefetch_args = plan(layer + 1, selection.forecast_scores(f, kc[layer + 1], pos2, sparse))
        pk[layer], pv[layer], kc[layer] = append_token(pk[layer], pv[layer], kc[layer], k, v, positions,
                                                       pk[layer].shape[2] - 2, sparse)
        attn = sparse_decode_attention(q[:, :, :, 0], pk[layer], pv[layer], *own)
        x = block.finish(x, attn[:, :, :, None])
        if keep_fill_inputs and prefetch_args is not None:
            # Hold the prefetch's index arrays live to the end of this layer. Freed at the fill, their memory is
            # reused by this layer's next temporaries, and in a CONCURRENT CUDA graph (edges from buffer
            # conflicts) that reuse makes the attention and MLP wait for the fill they were meant to hide.
            x, _ = jax.lax.optimization_barrier((x, prefetch_args))
    logits = model.logits(x[:, 0])
    new_state = dict(pool_k=pk, pool_v=pv, kc=kc, slot_block=sb, age=age,
                     block_slot=table if state["block_slot"] is not None else None, hook=hook_state, clock=clock,
                     positions=positions + 1)
    return logits, new_state, jnp.stack(counts)


def _fused_decode_steps(graphdef, params_tree, params, state, tokens, hosts, num_steps, keys, sampling, *,
                        max_steps: int, num_layers: int, sampled: bool, **step_kw):
    """`num_steps` (<= max_steps; traced, so one compile serves every count) decode steps of `_fused_step` in one
    program, each step's token fed to the next: the host enqueues, and XLA checks the step's CUDA graph for moved
    buffers, once per call instead of once per token. sampled: step i draws with `sample(logits, keys[i],
    *sampling)` (keys [max_steps]); else greedy (keys and sampling unused). Returns the tokens [max_steps, B] (rows
    past num_steps are -1), the state and the counts [max_steps, L, 3]."""

    def body(i, carry):
        state, tokens, out, counts = carry
        logits, state, step_counts = _fused_step(graphdef, params_tree, params, state, tokens, hosts, **step_kw)
        tokens = sample(logits, keys[i], *sampling) if sampled else jnp.argmax(logits, -1).astype(jnp.int32)
        return state, tokens, out.at[i].set(tokens), counts.at[i].set(step_counts)

    out = jnp.full((max_steps, tokens.shape[0]), -1, jnp.int32)
    counts = jnp.zeros((max_steps, num_layers, 3), jnp.int32)
    state, _, out, counts = jax.lax.fori_loop(0, num_steps, body, (state, tokens, out, counts))
    return out, state, counts


class FusedOffloadEngine(OffloadEngine):
    """`transfer='zero-copy'`: the fused device-resident decode step. Same constructor and API as OffloadEngine.

    selection_hook: a `DeviceSelectionHook` (benchmarks; runs inside the jit). stream: put the fills on a second
    GPU stream (`compute_on('gpu_stream:1')`). fill_kernel: one of FILL_KERNELS or "auto" (AUTO_FILL_KERNEL by
    mode); fill_programs: the persistent kernel's program count (few leave SMs to the layer's compute; too few
    cannot keep PCIe busy).
    keep_fill_inputs: hold each prefetch's index arrays live to the end of the layer that issued it (see
    `_fused_step`), so that no buffer reuse links that layer's compute to the fill (H200, 2026-12-04, 32K B=8,
    CONCURRENT programs: fills hidden 0.93 against 0.16, 9.05 against 10.26 ms a step at k slots).
    slot_lookup: one of SLOT_LOOKUPS (see `slot_diff`) or "auto": the table where the pool holds more than k blocks
    (H200, 32K B=8, 4k slots: 8.27 ms per step against 11.42 with compare), compare at k slots (7.73 vs 7.74 ms at
    B=1; one table less per layer). graph_scheduling: one of GRAPH_SCHEDULING (GPU only) for the step and the
    programs, or None for XLA_FLAGS' setting, else XLA's default (LHS) for the step and CONCURRENT for the programs:
    a per-jit option would override XLA_FLAGS. fetch=False skips the fills (timing only: results are wrong).
    """

    def __init__(self, model, sparse: SparseConfig, *, selection_hook: DeviceSelectionHook | None = None,
                 hook_state: Any = None, stream: bool = False, fetch: bool = True, fill_kernel: str = "auto",
                 fill_programs: int = DEFAULT_FILL_PROGRAMS, keep_fill_inputs: bool = True, slot_lookup: str = "auto",
                 graph_scheduling: str | None = None, **kwargs):
        if kwargs.get("selection_override") is not None:
            raise SpardaError("the fused engine takes a device selection_hook, not a host selection_override")
        if fill_kernel not in (*FILL_KERNELS, "auto"):
            raise SpardaError(f"unknown fill kernel {fill_kernel!r} (choose from auto, {', '.join(FILL_KERNELS)})")
        if fill_programs < 1:
            raise SpardaError(f"fill_programs must be >= 1, got {fill_programs}")
        if slot_lookup not in (*SLOT_LOOKUPS, "auto"):
            raise SpardaError(f"unknown slot lookup {slot_lookup!r} (choose from auto, {', '.join(SLOT_LOOKUPS)})")
        if graph_scheduling not in (None, *GRAPH_SCHEDULING):
            raise SpardaError(f"unknown graph scheduling {graph_scheduling!r} (choose from "
                              f"{', '.join(GRAPH_SCHEDULING)})")
        kwargs["transfer"] = "zero-copy"
        super().__init__(model, sparse, **kwargs)
        if slot_lookup == "auto":
            slot_lookup = "table" if self.cache_slots > sparse.top_k_blocks else "compare"
        self.slot_lookup = slot_lookup
        self.fill_kernel = AUTO_FILL_KERNEL[self.selector] if fill_kernel == "auto" else fill_kernel
        self.on_gpu = jax.default_backend() == "gpu"
        self.hosts = host_arrays(self.store)
        graphdef, params = nnx.split(model)
        # Flattened once: an nnx.State is flattened in Python, Variable by Variable, on every call otherwise.
        params, params_tree = jax.tree.flatten(params)
        self._params = committed(params)
        opts = {}
        if graph_scheduling is not None:
            opts["xla_gpu_command_buffer_scheduling_mode"] = graph_scheduling
        if stream:
            opts["xla_gpu_experimental_stream_annotation"] = True
        step_kw = dict(selector=self.selector, sparse=sparse, num_blocks=self.num_blocks, interpret=not self.on_gpu,
                       stream=stream, fetch=fetch, fill_kernel=self.fill_kernel, fill_programs=fill_programs,
                       keep_fill_inputs=keep_fill_inputs, hook=selection_hook)
        step = functools.partial(_fused_step, graphdef, params_tree, **step_kw)
        self._step = jax.jit(step, donate_argnums=(1,), compiler_options=opts or None)
        programs = {sampled: functools.partial(_fused_decode_steps, graphdef, params_tree, max_steps=sparse.block_size,
                                               num_layers=self.config.num_layers, sampled=sampled, **step_kw)
                    for sampled in (False, True)}
        self._programs = {sampled: jax.jit(fn, donate_argnums=(1,),
                                           compiler_options=multi_step_options(opts, self.on_gpu) or None)
                          for sampled, fn in programs.items()}  # each compiled on its first use
        self._hook_state = hook_state
        self.state = None
        self.row_bytes = self.store.row_elems * self.store.dtype.itemsize

    # The base class fills self.pool_k / pool_v / kc (prefill, fill_synthetic); pack them into the device state.
    def _pack(self) -> None:
        b, kvh, p = self.batch, self.config.num_kv_heads, self.cache_slots
        layers = range(self.config.num_layers)
        self.state = committed(dict(pool_k=self.pool_k, pool_v=self.pool_v, kc=self.kc,
                                    slot_block=[jnp.full((b, kvh, p), -1, jnp.int32) for _ in layers],
                                    age=[jnp.full((b, kvh, p), -1, jnp.int32) for _ in layers],
                                    block_slot=[jnp.full((b, kvh, self.num_blocks), -1, jnp.int32) for _ in layers]
                                    if self.slot_lookup == "table" else None,
                                    hook=self._hook_state, clock=jnp.int32(0),
                                    positions=self.lengths.astype(np.int32)))
        self.pool_k = self.pool_v = self.kc = None  # owned by self.state (donated every step)
        self._stored_lengths = self.lengths.copy()  # tokens already in the host store (prefill / synthetic fill)
        if not self.on_gpu:
            self.hosts = host_arrays(self.store)

    def prefill(self, tokens, lengths=None):
        if self.state is not None:
            self._unpack()
        logits = super().prefill(tokens, lengths)
        self._pack()
        return logits

    def fill_synthetic(self, length: int, seed: int = 0, fill_store: bool = True) -> None:
        if self.state is not None:
            self._unpack()
        super().fill_synthetic(length, seed, fill_store)
        self._pack()

    def _unpack(self) -> None:
        self.pool_k, self.pool_v, self.kc = self.state["pool_k"], self.state["pool_v"], self.state["kc"]
        self.state = None

    def _flush_due(self, positions: np.ndarray) -> None:
        """Block cur-2 leaves its tail slot in this step: write it (all layers) to the host store first, unless its
        last token came from the prefill (then the store has it and the tail slot holds another block)."""
        s = self.sparse.block_size
        due = (positions % s == 0) & (positions - s > self._stored_lengths)
        seqs = [int(b) for b in np.nonzero(due)[0]]
        if not seqs:
            return
        blocks = [int(positions[b]) // s - 2 for b in seqs]
        slots = tuple(self.cache_slots + j % 2 for j in blocks)
        seq_arr = jnp.asarray(np.asarray(seqs, np.int32))
        ks = np.asarray(tail_rows(self.state["pool_k"], slots, seq_arr))
        vs = np.asarray(tail_rows(self.state["pool_v"], slots, seq_arr))
        for i, (b, j) in enumerate(zip(seqs, blocks)):
            self.store.data[:, b, :, j, 0] = ks[:, i]
            self.store.data[:, b, :, j, 1] = vs[:, i]
        if not self.on_gpu:  # CPU: the JAX host arrays are copies
            self.hosts = host_arrays(self.store)

    def decode(self, tokens, *, block: bool = True) -> jax.Array:
        """block=False returns at once (the step runs asynchronously): feed the next step device-side tokens and
        the host's dispatch overlaps the GPU's step. Every 64 steps `_flush_due` syncs once regardless."""
        tokens, positions = self._decode_inputs(tokens)
        if self.state is None:
            raise SpardaError("prefill (or fill_synthetic) first")
        t0 = time.perf_counter()
        self._flush_due(positions)
        logits, self.state, counts = self._step(self._params, self.state, committed(tokens), tuple(self.hosts))
        self.lengths = positions + 1
        step = StepStats(self._steps, "decode", float("nan"), dispatch_s=time.perf_counter() - t0)
        if block:
            logits.block_until_ready()
            step.seconds = time.perf_counter() - t0
        step.pending = (counts, self.row_bytes, None)
        self.stats.append(step)
        self._steps += 1
        return logits

    def decode_greedy(self, tokens, num_steps: int) -> np.ndarray:
        """`num_steps` greedy tokens per sequence, fed back on the device: [num_steps, B] (waits for them).

        Runs as few programs as the tail flushes allow (one per block of 64 positions): the host's enqueue of a
        step (the bound on a pipelined `decode` loop at small batch) is paid once per program. Each token still
        gets its StepStats, with the program's dispatch time spread over its steps."""
        return self._run_programs(tokens, num_steps, None, None)

    def decode_sampled(self, tokens, keys: jax.Array, sampling: SamplingConfig) -> np.ndarray:
        """As `decode_greedy`, one token per key of `keys` [n] (typed PRNG keys): step i samples with keys[i]."""
        return self._run_programs(tokens, int(keys.shape[0]), keys, sampling.as_arrays())

    def _run_programs(self, tokens, num_steps: int, keys, sampling) -> np.ndarray:
        tokens, positions = self._decode_inputs(tokens)
        if self.state is None:
            raise SpardaError("prefill (or fill_synthetic) first")
        check_program_length(num_steps, int(positions.max()), self.max_len)
        s = self.sparse.block_size
        program = self._programs[keys is not None]
        if keys is not None:
            # Every program takes s keys (one shape, one compile), padded past the last step. The padding and
            # slicing happen on the host: as eager jax ops they would compile for every new length (H200: 17 ms
            # per step of a 32-step call).
            impl = jax.random.key_impl(keys)
            raw = np.asarray(jax.random.key_data(keys))
            raw = np.concatenate([raw, np.broadcast_to(raw[:1], (s, *raw.shape[1:]))])
        tokens = committed(tokens)
        programs = []
        while (done := sum(n for _, n in programs)) < num_steps:
            t0 = time.perf_counter()
            self._flush_due(self.lengths)
            # No sequence may reach its next block boundary inside the program: the flush there needs the host.
            count = min(num_steps - done, int((s - self.lengths % s).min()))
            step_keys = None if keys is None else jax.random.wrap_key_data(raw[done:done + s], impl=impl)
            out, self.state, counts = program(self._params, self.state, tokens, tuple(self.hosts), np.int32(count),
                                              step_keys, sampling)
            self.stats += program_steps(self._steps, count, (time.perf_counter() - t0) / count, counts,
                                        self.row_bytes)
            self._steps += count
            self.lengths = self.lengths + count
            tokens = out[count - 1]
            programs.append((out, count))
        return np.concatenate([np.asarray(out)[:n] for out, n in programs])

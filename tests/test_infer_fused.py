"""The fused device-resident offload step (infer/fused.py, transfer 'zero-copy'): logits equal the resident model
at every step, and the device slot map's misses equal the host `SlotMap` on the same selections."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer.engine import ResidentEngine, make_engine
from infer.fused import FusedOffloadEngine, slot_diff
from infer.programs import LOOP_GRAPH_COMMANDS, multi_step_options
from infer.slots import SlotMap
from sparda_jax.config import SparseConfig
from sparda_jax.errors import SpardaError

SPARSE = SparseConfig(top_k_blocks=4, local_blocks=1)


def _record(layer, ids, positions, state):
    """A device selection hook that keeps the selections (so the test can replay them through SlotMap)."""
    state = list(state)
    state[layer] = ids
    return ids, tuple(state)


UNEVEN, ON_BOUNDARY = (300, 253), (320, 256)
FILLS = {"grid": dict(fill_kernel="grid"), "persistent3": dict(fill_kernel="persistent", fill_programs=3),
         "grid+nokeep": dict(fill_kernel="grid", keep_fill_inputs=False)}


@pytest.mark.parametrize("mode,fill_kernel,slot_lookup,cache_slots,prompt_lengths", [
    ("sparse", "grid", "compare", 4, UNEVEN), ("sparda", "grid", "compare", 4, UNEVEN),
    ("sparda", "persistent3", "compare", 4, UNEVEN), ("sparda", "grid+nokeep", "compare", 4, UNEVEN),
    ("sparda", "grid", "table", 4, UNEVEN),
    ("sparse", "grid", "compare", 8, UNEVEN), ("sparse", "grid", "table", 8, UNEVEN),
    ("sparda", "grid", "compare", 4, ON_BOUNDARY)])
def test_fused_matches_resident_and_slot_map(tiny_engine_model, mode, fill_kernel, slot_lookup, cache_slots,
                                             prompt_lengths):
    """cache_slots 4 = k (the paper's pool: every unused slot is a victim); 8 = an LRU block cache of 2k.
    ON_BOUNDARY: prompts that end on a block boundary (the first tail flush must skip the block the prefill
    stored). persistent3: the persistent fill with 3 programs, so each loops over several misses; grid+nokeep: the
    prefetch's inputs not held live to the end of the layer."""
    lengths = np.array(prompt_lengths)  # two sequences of different lengths
    b, steps = 2, 70  # crosses block boundaries (tail flushes, compressed keys); k slots force evictions
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, tiny_engine_model.config.vocab_size, (b, 320)).astype(np.int32)
    ref = ResidentEngine(tiny_engine_model, SPARSE, mode=mode, batch=b, max_len=1024)
    hook_state = tuple(jnp.zeros((b, tiny_engine_model.config.num_kv_heads, SPARSE.top_k_blocks), jnp.int32)
                       for _ in range(tiny_engine_model.config.num_layers))
    eng = make_engine(tiny_engine_model, SPARSE, mode + "-offload", batch=b, max_len=1024, prefill_chunk=128,
                      transfer="zero-copy", selection_hook=_record, hook_state=hook_state, **FILLS[fill_kernel],
                      slot_lookup=slot_lookup, cache_slots=cache_slots)
    assert isinstance(eng, FusedOffloadEngine)
    maps = [SlotMap(b, tiny_engine_model.config.num_kv_heads, 1024 // 64, cache_slots, 64)
            for _ in range(tiny_engine_model.config.num_layers)]
    with eng:
        np.testing.assert_allclose(eng.prefill(tokens, lengths), ref.prefill(tokens, lengths), rtol=2e-5, atol=2e-5)
        for step in range(steps):
            nxt = rng.integers(0, tiny_engine_model.config.vocab_size, (b,))
            positions = eng.lengths.copy()
            np.testing.assert_allclose(eng.decode(nxt), ref.decode(nxt), rtol=2e-5, atol=2e-5,
                                       err_msg=f"step {step}")
            got = eng.stats[-1].layers if eng.stats[-1].resolve() else None
            for layer, m in enumerate(maps):
                plan = m.plan(np.asarray(eng.state["hook"][layer]), positions)
                assert (got[layer].hits, got[layer].tail_hits, got[layer].misses) == \
                       (plan.hits, plan.tail_hits, plan.misses), f"step {step} layer {layer}"
                np.testing.assert_array_equal(np.asarray(eng.state["slot_block"][layer]), m.slot_block,
                                              err_msg=f"slot map, step {step} layer {layer}")
    decode = [s for s in eng.stats if s.kind == "decode"]
    assert sum(s.total("misses") for s in decode[1:]) > 0
    assert sum(s.total("hits") for s in decode) > 0
    assert all(s.total("bytes") == s.total("misses") * 2 * 64 * 8 * 4 for s in decode)


def test_pipelined_greedy_decode_matches_blocking_resident(tiny_engine_model):
    """block=False steps fed device-side tokens (no host read between steps) give the resident engine's greedy
    tokens, across a tail flush; their stats carry a dispatch time and no step time."""
    import jax

    lengths = np.array([300, 253])
    b, steps = 2, 40  # sequence 0 passes position 320: a completed block is flushed to the host mid-loop
    tokens = np.random.default_rng(1).integers(0, tiny_engine_model.config.vocab_size, (b, 320)).astype(np.int32)
    ref = ResidentEngine(tiny_engine_model, SPARSE, mode="sparda", batch=b, max_len=1024)
    want = [np.argmax(np.asarray(ref.prefill(tokens, lengths)), -1)]
    for _ in range(steps):
        want.append(np.argmax(np.asarray(ref.decode(want[-1])), -1))
    greedy = jax.jit(lambda logits: jnp.argmax(logits, -1).astype(jnp.int32))
    with make_engine(tiny_engine_model, SPARSE, "sparda-offload", batch=b, max_len=1024, prefill_chunk=128,
                     transfer="zero-copy") as eng:
        token = greedy(eng.prefill(tokens, lengths))
        got = [token]
        for _ in range(steps):
            token = greedy(eng.decode(token, block=False))
            got.append(token)
    np.testing.assert_array_equal(np.stack([np.asarray(t) for t in got]), np.stack(want))
    decode = [s for s in eng.stats if s.kind == "decode"]
    assert all(np.isnan(s.seconds) and s.dispatch_s > 0 for s in decode)
    # blocking steps: the enqueue is part of the step, and returns before the step ends
    blocking = [s for s in ref.stats if s.kind == "decode"]
    assert all(0 < s.dispatch_s <= s.seconds for s in blocking)
    assert sum(s.dispatch_s for s in blocking) < sum(s.seconds for s in blocking)
    assert eng._step._cache_size() == 1  # one compile: see pallas_kernels/__init__.py


@pytest.mark.parametrize("mode", ["sparse", "sparda"])
def test_multi_step_greedy_decode_matches_resident_and_single_steps(tiny_engine_model, mode):
    """decode_greedy (a few programs of up to 64 steps, split at block boundaries for the tail flushes) gives the
    resident engine's greedy tokens and, step by step, the same hit / miss counts as single fused steps."""
    # Tail flushes: sequence 1 at positions 320 and 384 (steps 67, 131), sequence 0 at 384 (step 84).
    lengths = np.array([300, 253])
    b, steps = 2, 140
    tokens = np.random.default_rng(2).integers(0, tiny_engine_model.config.vocab_size, (b, 320)).astype(np.int32)
    ref = ResidentEngine(tiny_engine_model, SPARSE, mode=mode, batch=b, max_len=1024)
    want = [np.argmax(np.asarray(ref.prefill(tokens, lengths)), -1)]
    for _ in range(steps):
        want.append(np.argmax(np.asarray(ref.decode(want[-1])), -1))
    kw = dict(batch=b, max_len=1024, prefill_chunk=128, transfer="zero-copy", cache_slots=6)
    with make_engine(tiny_engine_model, SPARSE, mode + "-offload", **kw) as eng, \
            make_engine(tiny_engine_model, SPARSE, mode + "-offload", **kw) as single:
        first = np.argmax(np.asarray(eng.prefill(tokens, lengths)), -1)
        got = eng.decode_greedy(first, 30)
        got = np.concatenate([got, eng.decode_greedy(got[-1], steps - 30)])
        single.prefill(tokens, lengths)
        for t in want[:-1]:
            single.decode(t)
        np.testing.assert_array_equal(eng.lengths, lengths + steps)
        # blocks 0-4 of both sequences are in the store now (prefill, then the flushes); the rest is unwritten
        np.testing.assert_array_equal(eng.store.data[:, :, :, :5], single.store.data[:, :, :, :5])
    np.testing.assert_array_equal(got, np.stack(want[1:]))
    multi = [s for s in eng.stats if s.kind == "decode"]
    ones = [s for s in single.stats if s.kind == "decode"]
    assert len(multi) == steps and [s.step for s in multi] == list(range(1, steps + 1))
    for n, (m, o) in enumerate(zip(multi, ones)):
        assert [(x.hits, x.tail_hits, x.misses, x.bytes) for x in m.resolve().layers] == \
               [(x.hits, x.tail_hits, x.misses, x.bytes) for x in o.resolve().layers], f"step {n}"
    assert sum(s.total("misses") for s in multi) > 0
    assert eng._programs[False]._cache_size() == 1  # every program length runs the same compile


def test_multi_step_sampling_draws_step_i_with_key_i(tiny_engine_model, caplog):
    """decode_sampled gives the tokens of single fused steps sampled one at a time with the same keys (temperature
    1, top-k 20, top-p 0.9), across a tail flush (sequence 1 reaches 320 at step 67)."""
    from sparda_jax.sampling import SamplingConfig, sample

    lengths, b, steps = np.array([300, 253]), 2, 75
    tokens = np.random.default_rng(4).integers(0, tiny_engine_model.config.vocab_size, (b, 320)).astype(np.int32)
    sampling = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9)
    keys = jax.random.split(jax.random.key(7), steps)
    kw = dict(batch=b, max_len=1024, prefill_chunk=128, transfer="zero-copy")
    with make_engine(tiny_engine_model, SPARSE, "sparda-offload", **kw) as eng, \
            make_engine(tiny_engine_model, SPARSE, "sparda-offload", **kw) as single:
        first = np.argmax(np.asarray(eng.prefill(tokens, lengths)), -1).astype(np.int32)
        got = eng.decode_sampled(first, keys, sampling)
        single.prefill(tokens, lengths)
        want, token = [], first
        for i in range(steps):
            token = np.asarray(sample(single.decode(token), keys[i], *sampling.as_arrays()))
            want.append(token)
        # New lengths compile nothing, not even the keys' padding and slicing around the program (on the H200
        # those eager compiles cost 17 ms per step of a 32-step call).
        with jax.log_compiles(True), caplog.at_level(logging.WARNING):
            for n in (3, 5):
                eng.decode_sampled(got[-1], jax.random.wrap_key_data(np.arange(2 * n, dtype=np.uint32).reshape(n, 2)),
                                   sampling)
        assert not [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    np.testing.assert_array_equal(got, np.stack(want))
    assert len({tuple(t) for t in got}) > steps // 2  # sampled, not a repeated greedy token
    assert eng._programs[True]._cache_size() == 1 and eng._programs[False]._cache_size() == 0


@pytest.mark.parametrize("on_gpu,xla_flags,expected", [
    (True, "", LOOP_GRAPH_COMMANDS), (True, "--xla_gpu_enable_command_buffer= --foo", None), (False, "", None)])
def test_multi_step_program_puts_its_loop_in_the_graph_unless_xla_flags_decide(on_gpu, xla_flags, expected):
    options = multi_step_options({"xla_gpu_command_buffer_scheduling_mode": "LHS"}, on_gpu, xla_flags)
    assert options.get("xla_gpu_enable_command_buffer") == expected
    assert options["xla_gpu_command_buffer_scheduling_mode"] == "LHS"


@pytest.mark.parametrize("on_gpu,xla_flags,expected", [
    (True, "", "CONCURRENT"), (True, "--xla_gpu_command_buffer_scheduling_mode=LHS", None), (False, "", None)])
def test_multi_step_program_orders_its_graph_concurrently_unless_told_otherwise(on_gpu, xla_flags, expected):
    assert multi_step_options({}, on_gpu, xla_flags).get("xla_gpu_command_buffer_scheduling_mode") == expected


def test_multi_step_options_are_valid_xla_options():
    # The GPU options go through XLA's option parser on any backend: a wrong command-buffer type name (e.g.
    # DYNAMIC_SLICE_COPY_FUSION, which jax 0.11.2's XLA does not know) fails here, not first on the GPU.
    options = multi_step_options({}, on_gpu=True, xla_flags="")
    assert options["xla_gpu_enable_command_buffer"] == LOOP_GRAPH_COMMANDS
    assert int(jax.jit(lambda x: x + 1, compiler_options=options)(jnp.int32(1))) == 2
    with pytest.raises(Exception, match="not a valid enum value"):
        jax.jit(lambda x: x + 1, compiler_options={"xla_gpu_enable_command_buffer": "FUSION,NO_SUCH_TYPE"})(1)


@pytest.mark.parametrize("num_steps,match", [(0, "num_steps must be >= 1"), (200, "cannot hold 200 more")])
def test_multi_step_greedy_decode_rejects_bad_step_counts(tiny_engine_model, num_steps, match):
    with make_engine(tiny_engine_model, SPARSE, "sparda-offload", batch=1, max_len=384, prefill_chunk=128,
                     transfer="zero-copy") as eng:
        eng.prefill(np.ones((1, 256), np.int32))
        with pytest.raises(SpardaError, match=match):
            eng.decode_greedy(np.ones(1, np.int32), num_steps)
        assert eng.lengths.tolist() == [256]


@pytest.mark.parametrize("slot_lookup,cache_slots", [("compare", 6), ("table", 6), ("compare", 10), ("table", 10)])
def test_slot_diff_matches_slot_map_under_heavy_eviction(slot_lookup, cache_slots):
    """Random selections from a few blocks: blocks are evicted and selected again every step. Slots chosen, slot
    map and counts equal the numpy `SlotMap` (an independent implementation of the same rule) at every step."""
    b, kvh, k, num_blocks, s = 2, 2, 6, 40, 64
    positions = np.array([30 * s + 5, 35 * s])  # tails: blocks 29-30 and 34-35
    rng = np.random.default_rng(3)
    ref = SlotMap(b, kvh, num_blocks, cache_slots, s)
    slot_block = jnp.full((b, kvh, cache_slots), -1, jnp.int32)
    age = jnp.full((b, kvh, cache_slots), -1, jnp.int32)
    table = jnp.full((b, kvh, num_blocks), -1, jnp.int32) if slot_lookup == "table" else None
    diff = jax.jit(lambda *a: slot_diff(*a, num_blocks=num_blocks, block_size=s))
    hits = misses = 0
    for step in range(40):
        ids = np.stack([np.stack([rng.choice(16, k, replace=False) for _ in range(kvh)]) for _ in range(b)])
        ids[0, 0, -1] = 30  # a tail block
        ids[1, 1, 0] = -1  # an empty entry
        ids = ids.astype(np.int32)
        plan = ref.plan(ids, positions)
        slot, lengths, src, dst, slot_block, age, table, counts = diff(
            jnp.asarray(ids), jnp.asarray(positions, jnp.int32), slot_block, age, jnp.int32(step + 1), table)
        np.testing.assert_array_equal(np.asarray(slot), plan.slot_ids, err_msg=f"step {step}")
        np.testing.assert_array_equal(np.asarray(lengths), plan.slot_lengths, err_msg=f"step {step}")
        np.testing.assert_array_equal(np.asarray(slot_block), ref.slot_block, err_msg=f"step {step}")
        assert np.asarray(counts).tolist() == [plan.hits, plan.tail_hits, plan.misses], f"step {step}"
        hits, misses = hits + plan.hits, misses + plan.misses
    assert hits > 50 and misses > 50


@pytest.mark.parametrize("cache_slots,expected", [(None, "compare"), (SPARSE.top_k_blocks, "compare"),
                                                  (2 * SPARSE.top_k_blocks, "table")])
def test_auto_slot_lookup_uses_the_table_only_for_a_pool_larger_than_k(tiny_engine_model, cache_slots, expected):
    eng = make_engine(tiny_engine_model, SPARSE, "sparda-offload", batch=1, max_len=1024, transfer="zero-copy",
                      cache_slots=cache_slots)
    with eng:
        assert eng.slot_lookup == expected


@pytest.mark.parametrize("mode,fill_kernel,expected", [
    ("sparda", "auto", "persistent"), ("sparse", "auto", "grid"), ("sparda", "grid", "grid"),
    ("sparse", "persistent", "persistent")])
def test_auto_fill_kernel_is_persistent_for_the_prefetch_and_grid_for_the_waited_fill(tiny_engine_model, mode,
                                                                                       fill_kernel, expected):
    with make_engine(tiny_engine_model, SPARSE, mode + "-offload", batch=1, max_len=1024, transfer="zero-copy",
                     fill_kernel=fill_kernel) as eng:
        assert eng.fill_kernel == expected


@pytest.mark.parametrize("option,match", [(dict(slot_lookup="hash"), "unknown slot lookup 'hash'"),
                                          (dict(fill_kernel="tma"), "unknown fill kernel 'tma'"),
                                          (dict(graph_scheduling="random"), "unknown graph scheduling 'random'"),
                                          (dict(fill_programs=0), "fill_programs must be >= 1, got 0")])
def test_bad_engine_options_are_clear_errors(tiny_engine_model, option, match):
    with pytest.raises(SpardaError, match=match):
        make_engine(tiny_engine_model, SPARSE, "sparda-offload", batch=1, max_len=1024, transfer="zero-copy",
                    **option)


@pytest.mark.parametrize("graph_scheduling,expected", [(None, None), ("CONCURRENT", "CONCURRENT")])
def test_graph_scheduling_reaches_the_step_only_when_given(tiny_engine_model, monkeypatch, graph_scheduling,
                                                           expected):
    """A per-jit compiler option overrides XLA_FLAGS, so by default the step (and the multi-step programs) must not
    pass one."""
    real_jit, seen = jax.jit, []

    def spy(fun, **kwargs):
        seen.append(kwargs.get("compiler_options") or {})
        return real_jit(fun, **kwargs)

    monkeypatch.setattr(jax, "jit", spy)
    make_engine(tiny_engine_model, SPARSE, "sparda-offload", batch=1, max_len=1024, transfer="zero-copy",
                graph_scheduling=graph_scheduling)
    assert [o.get("xla_gpu_command_buffer_scheduling_mode") for o in seen] == [expected] * 3


@pytest.mark.parametrize("mode,keep,expected", [("sparda", True, 1), ("sparda", False, 0), ("sparse", True, 0)])
def test_prefetch_inputs_are_held_to_the_end_of_the_issuing_layer(tiny_engine_model, mode, keep, expected):
    """The barrier that keeps a prefetch's index arrays live has no effect on values (the tests above pass without
    it), so check it is in the step: one per prefetch (layers 1..L-1 in sparda-offload), none in sparse-offload,
    whose fills are not prefetches."""
    with make_engine(tiny_engine_model, SPARSE, mode + "-offload", batch=1, max_len=512, prefill_chunk=128,
                     transfer="zero-copy", keep_fill_inputs=keep) as eng:
        eng.prefill(np.ones((1, 256), np.int32))
        hlo = eng._step.lower(eng._params, eng.state, np.ones(1, np.int32), tuple(eng.hosts)).as_text()
    prefetches = tiny_engine_model.config.num_layers - 1
    assert hlo.count("stablehlo.optimization_barrier") == expected * prefetches

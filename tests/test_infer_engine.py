"""The offload engine (infer/): slot bookkeeping, equality with the resident model, failures and shutdown."""

import threading

import numpy as np
import pytest

from infer.engine import OffloadEngine, ResidentEngine, cache_slots_for_memory, make_engine
from infer.slots import SlotMap
from sparda_jax.config import SparseConfig
from sparda_jax.errors import SpardaError

SPARSE = SparseConfig(top_k_blocks=4, local_blocks=1)


def test_slot_map_hits_misses_and_lru():
    m = SlotMap(batch=1, kv_heads=1, num_blocks=16, cache_slots=3, block_size=64)
    pos = np.array([640])  # current block 10; blocks 9 and 10 live in the tail slots
    p = m.plan(np.array([[[0, 10, 9, 3]]]), pos)
    assert (p.hits, p.tail_hits, p.misses) == (0, 2, 2)
    assert p.slot_ids[0, 0, 1] == 3 + 10 % 2 and p.slot_ids[0, 0, 2] == 3 + 9 % 2
    p = m.plan(np.array([[[0, 10, 9, 5]]]), pos)  # 0 hits, 5 takes the free slot
    assert (p.hits, p.misses) == (1, 1) and list(p.miss_block) == [5]
    p = m.plan(np.array([[[0, 10, 9, 7]]]), pos)  # full: evicts the least recently used (3)
    assert list(p.miss_block) == [7] and m.block_slot[0, 0, 3] == -1 and m.block_slot[0, 0, 7] >= 0
    assert p.slot_lengths[0, 0].tolist() == [64, 1, 64, 64]


def _decode_both(model, sparse, mode, batch_lengths, steps, **kwargs):
    b = len(batch_lengths)
    t = -(-max(batch_lengths) // 64) * 64
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.config.vocab_size, (b, t)).astype(np.int32)
    lengths = np.asarray(batch_lengths)
    ref = ResidentEngine(model, sparse, mode=mode, batch=b, max_len=1024)
    off = OffloadEngine(model, sparse, mode=mode + "-offload", batch=b, max_len=1024, prefill_chunk=128, **kwargs)
    with off:
        np.testing.assert_allclose(off.prefill(tokens, lengths), ref.prefill(tokens, lengths), rtol=2e-5, atol=2e-5)
        for step in range(steps):
            nxt = rng.integers(0, model.config.vocab_size, (b,))
            np.testing.assert_allclose(off.decode(nxt), ref.decode(nxt), rtol=2e-5, atol=2e-5, err_msg=f"step {step}")
        return off.stats


@pytest.mark.parametrize("mode,transfer", [("sparda", "host-gather"), ("sparse", "host-gather")])
def test_offload_logits_match_resident(tiny_engine_model, mode, transfer):
    # Two sequences of different lengths; 70 steps cross block boundaries (tail flush, compressed keys) and the
    # pool of exactly k slots forces evictions.
    stats = _decode_both(tiny_engine_model, SPARSE, mode, [300, 253], 70, transfer=transfer)
    decode = [s for s in stats if s.kind == "decode"]
    assert sum(s.total("misses") for s in decode[1:]) > 0
    assert all(s.total("bytes") == s.total("misses") * 2 * 64 * 8 * 4 for s in decode)


def test_block_cache_lowers_misses(tiny_engine_model):
    small = _decode_both(tiny_engine_model, SPARSE, "sparda", [500], 40)
    large = _decode_both(tiny_engine_model, SPARSE, "sparda", [500], 40, cache_slots=16)
    count = lambda st: sum(s.total("misses") for s in st if s.kind == "decode")  # noqa: E731
    assert count(large) < count(small)


def test_budget_error_before_allocation(tiny_engine_model, monkeypatch):
    import infer.host_store as hs

    monkeypatch.setattr(hs.HostKVStore, "_allocate", lambda *a: pytest.fail("allocated despite the budget"))
    with pytest.raises(SpardaError, match="host-memory-gb"):
        OffloadEngine(tiny_engine_model, SPARSE, mode="sparda-offload", batch=4, max_len=1024, host_memory_gb=1e-6)
    with pytest.raises(SpardaError, match="unknown engine mode"):
        make_engine(tiny_engine_model, SPARSE, "offload", batch=1, max_len=1024)


def test_prefetch_exception_reaches_caller_and_threads_join(tiny_engine_model):
    engine = OffloadEngine(tiny_engine_model, SPARSE, mode="sparda-offload", batch=1, max_len=1024)
    tokens = np.arange(320, dtype=np.int32)[None] % tiny_engine_model.config.vocab_size
    engine.prefill(tokens)
    original = engine.store.flat

    def broken(layer):
        if layer == 2:
            raise OSError("host store unreadable")
        return original(layer)

    engine.store.flat = broken
    with pytest.raises(OSError, match="unreadable"):
        for _ in range(3):  # the first step hits the blocks it needs after prefill; later ones miss
            engine.store.data[...] = engine.store.data  # keep the store live
            engine.maps[2].reset()  # force misses on layer 2, fetched by the prefetch thread
            engine.decode(np.array([1]))
    engine.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("sparda-")]
    with pytest.raises(SpardaError, match="closed"):
        engine.decode(np.array([1]))


def test_cache_slots_for_memory_by_hand(tiny_engine_model):
    # 3 layers x 2 sequences x 2 KV heads x (K, V) x 64 tokens x head_dim 8 x 4 bytes = 49152 bytes per slot
    c = tiny_engine_model.config
    assert cache_slots_for_memory(c, SPARSE, 2, 16, 4, 10 * 49152 + 1) == 10
    assert cache_slots_for_memory(c, SPARSE, 2, 16, 4, 1e9) == 16  # never more than the context's blocks
    assert cache_slots_for_memory(c, SPARSE, 2, 16, 4, 0) == SPARSE.top_k_blocks  # the pool the step needs


@pytest.mark.parametrize("transfer", ["host-gather", "zero-copy"])
def test_auto_cache_slots(tiny_engine_model, transfer):
    def engine(**kw):
        return make_engine(tiny_engine_model, SPARSE, "sparda-offload", batch=2, max_len=1024, transfer=transfer, **kw)

    with engine(cache_slots="auto", cache_memory_gb=10 * 49152 / 1e9) as eng:
        assert eng.cache_slots == 10 and eng.pool_k[0].shape[2] == 12  # and the two tail slots
    with engine(cache_slots="auto") as eng:  # the CPU reports no device memory: the paper's k-slot pool
        assert eng.cache_slots == SPARSE.top_k_blocks
    for kw, message in [({"cache_slots": "all"}, "cache_slots must be"), ({"cache_slots": 0}, "cache_slots must be"),
                        ({"cache_slots": 8, "cache_memory_gb": 1.0}, 'sizes cache_slots="auto" only'),
                        ({"cache_slots": "auto", "cache_memory_gb": -1.0}, "cache_memory_gb must be > 0")]:
        with pytest.raises(SpardaError, match=message):
            engine(**kw)


STEP_FUNCTIONS = {"run", "_front", "_back", "_embed", "_logits", "_scatter", "_fused_step"}


@pytest.mark.parametrize("mode,transfer", [("sparda", None), ("sparda-offload", "host-gather"),
                                           ("sparda-offload", "zero-copy")])
def test_decode_compiles_once_whatever_the_tokens(tiny_engine_model, caplog, mode, transfer):
    """jit keys its cache on each argument's commitment: the step must not compile again when the tokens switch
    from numpy to a committed device array (a sampler's output) or back."""
    import jax
    import jax.numpy as jnp

    tokens = np.random.default_rng(0).integers(0, tiny_engine_model.config.vocab_size, (2, 320)).astype(np.int32)
    kwargs = {} if transfer is None else dict(transfer=transfer, prefill_chunk=128)
    with make_engine(tiny_engine_model, SPARSE, mode, batch=2, max_len=1024, **kwargs) as eng:
        eng.prefill(tokens, np.array([300, 253]))
        eng.decode(np.ones(2, np.int32))
        with jax.log_compiles(), caplog.at_level("WARNING"):
            eng.decode(np.ones(2, np.int32))
            eng.decode(jax.device_put(jnp.ones(2, jnp.int32), jax.devices()[0]), block=False)
            eng.decode(jnp.ones(2, jnp.int32), block=False).block_until_ready()
            eng.decode([1, 1])
    compiled = {m.split("(")[1].split(")")[0] for m in caplog.messages if m.startswith("Compiling jit(")}
    assert not compiled & STEP_FUNCTIONS, sorted(compiled)


@pytest.mark.parametrize("mode", ["dense", "sparda"])
def test_resident_multi_step_greedy_matches_single_steps(tiny_engine_model, mode):
    """ResidentEngine.decode_greedy (programs of up to 64 steps) gives the tokens of blocking single steps with a
    host argmax, across a program boundary; it refuses steps past the context."""
    b, steps = 2, 70
    tokens = np.random.default_rng(5).integers(0, tiny_engine_model.config.vocab_size, (b, 256)).astype(np.int32)
    lengths = np.array([200, 150])  # a 256-token chunk, padded per sequence
    ref = ResidentEngine(tiny_engine_model, SPARSE, mode=mode, batch=b, max_len=512)
    want = [np.argmax(np.asarray(ref.prefill(tokens, lengths)), -1)]
    for _ in range(steps):
        want.append(np.argmax(np.asarray(ref.decode(want[-1])), -1))
    eng = ResidentEngine(tiny_engine_model, SPARSE, mode=mode, batch=b, max_len=512)
    eng.prefill(tokens, lengths)
    np.testing.assert_array_equal(eng.decode_greedy(want[0], steps), np.stack(want[1:]))
    assert len([s for s in eng.stats if s.kind == "decode"]) == steps and eng._greedy._cache_size() == 1
    with pytest.raises(SpardaError, match="context 512 cannot hold 300 more tokens after 270"):
        eng.decode_greedy(want[-1], 300)

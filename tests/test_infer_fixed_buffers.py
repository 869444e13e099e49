"""load_into / copy_out (infer.fixed_buffers), and engines' returned logits outliving the next step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer.fixed_buffers import copy_out, load_into


def test_load_into_casts_and_reshapes_into_the_buffer():
    buffer = load_into(jnp.zeros(3, jnp.int32), np.array([[1.0], [2.0], [7.0]]))
    assert buffer.dtype == jnp.int32 and buffer.shape == (3,)
    np.testing.assert_array_equal(np.asarray(buffer), [1, 2, 7])


def test_copies_survive_the_originals_being_donated_and_overwritten():
    buffer = load_into(jnp.zeros(2, jnp.int32), np.array([4, 5]))
    (kept,) = copy_out(buffer)
    buffer = load_into(buffer, np.array([8, 9]))
    buffer.block_until_ready()
    np.testing.assert_array_equal(np.asarray(kept), [4, 5])
    np.testing.assert_array_equal(np.asarray(buffer), [8, 9])


def test_donated_buffer_is_reused_in_place():
    buffer = jnp.zeros(4, jnp.int32).block_until_ready()  # idle, so even the CPU client donates it in place
    address = buffer.unsafe_buffer_pointer()
    buffer = load_into(buffer, np.arange(4))
    assert buffer.unsafe_buffer_pointer() == address


@pytest.mark.parametrize("mode", ["sparda", "sparda-offload"])
def test_logits_kept_from_earlier_steps_stay_valid(tiny_engine_model, mode):
    """Each step's logits live in a buffer the next step overwrites: the engines must hand out copies. Logits kept
    across non-blocking steps equal those of blocking steps of a second engine."""
    from infer.engine import make_engine
    from sparda_jax.config import SparseConfig

    sparse = SparseConfig(top_k_blocks=4, local_blocks=1)
    tokens = np.random.default_rng(2).integers(0, tiny_engine_model.config.vocab_size, (2, 256)).astype(np.int32)
    nxt = np.random.default_rng(3).integers(0, tiny_engine_model.config.vocab_size, (6, 2)).astype(np.int32)
    kwargs = dict(batch=2, max_len=512)
    if mode.endswith("offload"):
        kwargs.update(prefill_chunk=128, transfer="zero-copy")
    with make_engine(tiny_engine_model, sparse, mode, **kwargs) as blocking:
        blocking.prefill(tokens)
        want = [np.asarray(blocking.decode(t)) for t in nxt]
    with make_engine(tiny_engine_model, sparse, mode, **kwargs) as pipelined:
        pipelined.prefill(tokens)
        kept = [pipelined.decode(t, block=False) for t in nxt]
    assert len({float(np.asarray(k).sum()) for k in kept}) == len(kept)  # steps differ: overwriting would show
    for step, (k, w) in enumerate(zip(kept, want)):
        np.testing.assert_allclose(np.asarray(k), w, rtol=1e-6, atol=1e-6, err_msg=f"step {step}")

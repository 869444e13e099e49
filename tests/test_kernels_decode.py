"""pallas_kernels.sparse_decode: kernel (interpret mode) vs jnp reference vs an independent float64 numpy oracle."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_decode import (
    decode_launch_config,
    sparse_decode_attention,
    sparse_decode_attention_reference,
)

# Tolerances on the max abs error against the reference (outputs are O(1): convex combinations of N(0,1) V rows).
# float32: exact products in both; only summation order differs. bfloat16: the kernel feeds p to the second dot in
# bf16 and the output is rounded to bf16 (relative step 2^-8).
ATOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def numpy_decode(q, k_pool, v_pool, ids, lens, scale):
    """Float64 oracle with explicit loops: concatenate the valid tokens of the listed blocks, softmax, weighted sum."""
    q, k_pool, v_pool = (np.asarray(x, np.float64) for x in (q, k_pool, v_pool))
    b, h, g, d = q.shape
    out = np.zeros((b, h, g, d))
    for bi in range(b):
        for hi in range(h):
            ks, vs = [], []
            for j in range(ids.shape[-1]):
                blk, n = int(ids[bi, hi, j]), int(lens[bi, hi, j])
                if blk < 0 or n <= 0:
                    continue
                ks.append(k_pool[bi, hi, blk, :n])
                vs.append(v_pool[bi, hi, blk, :n])
            if not ks:
                continue  # nothing valid: zeros
            kk, vv = np.concatenate(ks), np.concatenate(vs)
            for gi in range(g):
                logits = kk @ q[bi, hi, gi] * scale
                w = np.exp(logits - logits.max())
                out[bi, hi, gi] = (w / w.sum()) @ vv
    return out


def make_case(rng, b, h, g, d, p, s, n, dtype, poison=True):
    """Random pool, a list of N unique ids (-1 padded when N > P, plus some random -1), ragged lengths (some 0).
    Pool rows that no list makes valid are NaN, so any read of them would show."""
    q = rng.standard_normal((b, h, g, d))
    k = rng.standard_normal((b, h, p, s, d))
    v = rng.standard_normal((b, h, p, s, d))
    ids = np.full((b, h, n), -1, np.int64)
    for bi in range(b):
        for hi in range(h):
            row = np.concatenate([rng.permutation(p), np.full(max(0, n - p), -1)])[:n]
            rng.shuffle(row)
            ids[bi, hi] = row
    ids[rng.random(ids.shape) < 0.15] = -1
    lens = rng.integers(0, s + 1, ids.shape)
    lens[rng.random(ids.shape) < 0.5] = s
    if poison:
        valid = np.zeros((b, h, p, s), bool)
        for bi, hi, j in np.ndindex(b, h, n):
            if ids[bi, hi, j] >= 0:
                valid[bi, hi, ids[bi, hi, j], : lens[bi, hi, j]] = True
        k[~valid] = np.nan
        v[~valid] = np.nan
    return (
        jnp.asarray(q, dtype),
        jnp.asarray(k, dtype),
        jnp.asarray(v, dtype),
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(lens, jnp.int32),
    )


# ----------------------------------------------------------------------------------------------------------------------
# the reference itself
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,b,h,g,d,p,s,n", [(0, 2, 2, 3, 16, 5, 8, 4), (1, 1, 3, 4, 32, 3, 16, 6)])
def test_reference_matches_numpy(seed, b, h, g, d, p, s, n):
    rng = np.random.default_rng(seed)
    args = make_case(rng, b, h, g, d, p, s, n, jnp.float32)
    scale = 0.3
    ref = sparse_decode_attention_reference(*args, sm_scale=scale)
    want = numpy_decode(*[np.asarray(a) for a in args], scale)
    assert np.all(np.isfinite(np.asarray(ref)))
    np.testing.assert_allclose(np.asarray(ref), want, atol=1e-5, rtol=1e-5)


def test_one_valid_token_returns_its_v_row():
    # Hand-checkable: pool block 2 holds the only valid token (length 1); every head's output is exactly that V row.
    b, h, g, d, p, s = 1, 1, 4, 16, 4, 8
    q = jnp.arange(g * d, dtype=jnp.float32).reshape(1, 1, g, d) / 10.0
    k = jnp.ones((b, h, p, s, d), jnp.float32)
    v = jnp.arange(p * s * d, dtype=jnp.float32).reshape(b, h, p, s, d)
    ids = jnp.asarray([[[2, -1, 0]]], jnp.int32)
    lens = jnp.asarray([[[1, 8, 0]]], jnp.int32)  # block 0 listed with 0 valid tokens: skipped
    for impl in ("reference", "pallas_interpret"):
        out = sparse_decode_attention(q, k, v, ids, lens, implementation=impl)
        np.testing.assert_array_equal(np.asarray(out)[0, 0], np.broadcast_to(np.asarray(v)[0, 0, 2, 0], (g, d)))


def test_equal_keys_average_values():
    # Two valid tokens with identical keys get weight 1/2 each.
    d = 16
    q = jnp.ones((1, 1, 1, d), jnp.float32)
    k = jnp.ones((1, 1, 2, 4, d), jnp.float32)
    v = jnp.zeros((1, 1, 2, 4, d), jnp.float32).at[0, 0, 1, 0].set(2.0).at[0, 0, 0, 3].set(4.0)
    ids = jnp.asarray([[[1, 0]]], jnp.int32)
    lens = jnp.asarray([[[1, 4]]], jnp.int32)  # tokens (1, 0) and (0, 0..3): 5 tokens, V sums to 2 + 4
    for impl in ("reference", "pallas_interpret"):
        out = sparse_decode_attention(q, k, v, ids, lens, implementation=impl)
        np.testing.assert_allclose(np.asarray(out)[0, 0, 0], np.full(d, 6.0 / 5.0), rtol=1e-6)


def test_nothing_valid_gives_zeros_not_nan():
    rng = np.random.default_rng(3)
    q, k, v, _, _ = make_case(rng, 2, 2, 4, 32, 3, 16, 3, jnp.float32, poison=False)
    ids = jnp.asarray([[[-1, -1, -1], [0, 1, 2]], [[-1, -1, -1], [-1, 2, -1]]], jnp.int32)
    lens = jnp.asarray([[[16, 16, 16], [0, 0, 0]], [[16, 16, 16], [16, 0, 16]]], jnp.int32)
    for impl in ("reference", "pallas_interpret"):
        out = np.asarray(sparse_decode_attention(q, k, v, ids, lens, implementation=impl))
        assert np.all(out == 0.0), impl


# ----------------------------------------------------------------------------------------------------------------------
# kernel vs reference
# ----------------------------------------------------------------------------------------------------------------------
SWEEP = [
    # (b, h, g, d, p, s, n, dtype)
    (2, 2, 1, 64, 6, 16, 4, jnp.float32),  # N below P
    (1, 2, 3, 64, 4, 16, 9, jnp.bfloat16),  # N above P (-1 tail), G padded 3 -> 16
    (2, 1, 4, 128, 5, 16, 5, jnp.float32),
    (1, 2, 4, 128, 7, 64, 6, jnp.bfloat16),  # the model's block size
    (1, 1, 16, 64, 5, 16, 7, jnp.bfloat16),
    (2, 1, 16, 128, 3, 16, 2, jnp.float32),
]


@pytest.mark.parametrize("b,h,g,d,p,s,n,dtype", SWEEP)
def test_kernel_matches_reference(b, h, g, d, p, s, n, dtype):
    rng = np.random.default_rng(b * 1000 + g * 10 + d)
    args = make_case(rng, b, h, g, d, p, s, n, dtype)
    ref = sparse_decode_attention_reference(*args)
    out = sparse_decode_attention(*args, implementation="pallas_interpret")
    assert out.dtype == dtype and out.shape == (b, h, g, d)
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out32))
    np.testing.assert_allclose(out32, ref32, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize(
    "knobs",
    [
        dict(id_source="prefetch", blocks_per_tile=2, num_splits=2),
        dict(id_source="loop", num_splits=3),
        dict(id_source="preload", kv_prefetch=True, blocks_per_tile=2),
        dict(id_source="preload", kv_prefetch=True, num_splits=1),
        dict(max_tiles_per_split=1),
    ],
)
def test_kernel_variants_match_reference(knobs):
    rng = np.random.default_rng(11)
    args = make_case(rng, 2, 2, 4, 64, 9, 16, 11, jnp.float32)
    ref = sparse_decode_attention_reference(*args)
    out = sparse_decode_attention(*args, implementation="pallas_interpret", **knobs)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=ATOL[jnp.float32], rtol=0)


def test_sm_scale_and_default_implementation():
    rng = np.random.default_rng(5)
    args = make_case(rng, 1, 2, 4, 32, 4, 16, 4, jnp.float32, poison=False)
    want = numpy_decode(*[np.asarray(a) for a in args], 0.7)
    got = sparse_decode_attention(*args, sm_scale=0.7, implementation="pallas_interpret")
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    # on a CPU backend None means the reference; default scale is 1/sqrt(D)
    assert jax.default_backend() != "gpu"
    np.testing.assert_array_equal(
        np.asarray(sparse_decode_attention(*args)),
        np.asarray(sparse_decode_attention_reference(*args, sm_scale=1 / math.sqrt(32))),
    )


def test_launch_config():
    # never an empty split; power-of-two steps per split; enough programs for the SMs
    for bh in (1, 8, 512):
        for n in (1, 5, 64, 129, 2048):
            nb, splits, tps = decode_launch_config(bh, n, 64, sm_count=132)
            tiles = -(-n // nb)
            assert splits * tps >= tiles and (splits - 1) * tps < tiles
            assert tps & (tps - 1) == 0
    assert decode_launch_config(1, 512, 64, num_splits=4, sm_count=132)[1:] == (4, 128)
    assert decode_launch_config(1, 10, 64, num_splits=100, sm_count=132)[1] == 10


# ----------------------------------------------------------------------------------------------------------------------
# argument checking
# ----------------------------------------------------------------------------------------------------------------------
def _good():
    return (
        jnp.zeros((2, 2, 4, 16)),
        jnp.zeros((2, 2, 3, 8, 16)),
        jnp.zeros((2, 2, 3, 8, 16)),
        jnp.zeros((2, 2, 5), jnp.int32),
        jnp.zeros((2, 2, 5), jnp.int32),
    )


@pytest.mark.parametrize(
    "index,bad,match",
    [
        (0, jnp.zeros((2, 2, 16)), r"q must be \[B, KV, G, D\]"),
        (1, jnp.zeros((2, 2, 3, 16)), r"k_pool must be \[B, KV, P, S, D\]"),
        (2, jnp.zeros((2, 2, 4, 8, 16)), "v_pool shape"),
        (1, jnp.zeros((2, 2, 3, 8, 32)), "does not match q"),
        (1, jnp.zeros((1, 2, 3, 8, 16)), "does not match q"),
        (3, jnp.zeros((2, 5), jnp.int32), "slot_ids must be"),
        (4, jnp.zeros((2, 2, 4), jnp.int32), "slot_lengths shape"),
        (3, jnp.zeros((2, 2, 5), jnp.float32), "slot_ids must be int32"),
        (4, jnp.zeros((2, 2, 5), jnp.int16), "slot_lengths must be int32"),
        (0, jnp.zeros((2, 2, 4, 16), jnp.int32), "q must be float32, bfloat16 or float16"),
        (1, jnp.zeros((2, 2, 3, 8, 16), jnp.bfloat16), "must share one dtype"),
    ],
)
def test_bad_arguments_raise(index, bad, match):
    args = list(_good())
    args[index] = bad
    if index == 1:  # change K and V together, so that only the checked property is off
        args[2] = bad
    with pytest.raises(ValueError, match=match):
        sparse_decode_attention(*args, implementation="pallas_interpret")
    with pytest.raises(ValueError, match=match):
        sparse_decode_attention_reference(*args)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="implementation must be one of"):
        sparse_decode_attention(*_good(), implementation="cuda")
    with pytest.raises(ValueError, match="id_source must be"):
        sparse_decode_attention(*_good(), implementation="pallas_interpret", id_source="nope")
    q, k, v, ids, lens = _good()
    k = jnp.zeros((2, 2, 3, 12, 16))
    with pytest.raises(ValueError, match="power-of-two block size"):
        sparse_decode_attention(q, k, k, ids, lens, implementation="pallas_interpret")

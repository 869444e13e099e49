"""pallas_kernels.sparse_prefill: kernel (interpret mode) vs jnp reference vs an independent float64 numpy oracle."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_prefill import (
    compact_block_ids,
    sparse_prefill_attention,
    sparse_prefill_attention_reference,
)

ATOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}  # see test_kernels_decode.py


def numpy_prefill(q, k, v, block_ids, kv_len, q_start, block_size, scale):
    """Float64 oracle with explicit loops: for each query, the tokens of its query block's listed KV blocks that are
    causal (position <= query position) and below kv_len; softmax over them; zeros when there are none."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, h, g, tq, d = q.shape
    out = np.zeros(q.shape)
    for bi in range(b):
        for hi in range(h):
            for t in range(tq):
                pos = q_start + t
                toks = []
                for blk in block_ids[bi, hi, t // block_size]:
                    if blk < 0:
                        continue
                    for j in range(blk * block_size, (blk + 1) * block_size):
                        if j <= pos and j < kv_len[bi]:
                            toks.append(j)
                if not toks:
                    continue
                kk, vv = k[bi, hi, toks], v[bi, hi, toks]
                for gi in range(g):
                    logits = kk @ q[bi, hi, gi, t] * scale
                    w = np.exp(logits - logits.max())
                    out[bi, hi, gi, t] = (w / w.sum()) @ vv
    return out


def make_case(rng, b, h, g, d, tq, tk, q_start, n, bs, dtype, kv_len=None):
    """Random q/k/v and per-query-block lists of up to N unique KV block ids (any block, even future ones: the causal
    mask must handle them), -1 padded, in random order."""
    q = jnp.asarray(rng.standard_normal((b, h, g, tq, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, h, tk, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, h, tk, d)), dtype)
    nkb = tk // bs
    ids = np.full((b, h, tq // bs, n), -1, np.int32)
    for idx in np.ndindex(b, h, tq // bs):
        m = rng.integers(0, n + 1)
        cand = rng.permutation(nkb)[: min(m, nkb)]
        ids[idx][: len(cand)] = cand
        rng.shuffle(ids[idx])
    if kv_len is None:
        kv_len = [tk] * b
    return q, k, v, jnp.asarray(ids), jnp.asarray(kv_len, jnp.int32)


# ----------------------------------------------------------------------------------------------------------------------
# the reference itself
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "seed,b,h,g,d,tq,tk,q_start,n,bs,kv_len",
    [(0, 2, 2, 3, 16, 16, 24, 8, 3, 8, (24, 13)), (1, 1, 2, 2, 8, 12, 12, 0, 2, 4, (12,))],
)
def test_reference_matches_numpy(seed, b, h, g, d, tq, tk, q_start, n, bs, kv_len):
    rng = np.random.default_rng(seed)
    q, k, v, ids, kvl = make_case(rng, b, h, g, d, tq, tk, q_start, n, bs, jnp.float32, kv_len)
    ref = sparse_prefill_attention_reference(q, k, v, ids, kvl, q_start=q_start, sm_scale=0.4, block_size=bs)
    want = numpy_prefill(q, k, v, np.asarray(ids), np.asarray(kvl), q_start, bs, 0.4)
    assert np.all(np.isfinite(np.asarray(ref)))
    np.testing.assert_allclose(np.asarray(ref), want, atol=1e-5, rtol=1e-5)


def test_first_query_sees_only_token_zero():
    # Hand-checkable: the query at position 0 with block 0 listed sees exactly token 0, so its output is V[0]; the
    # query at position 1 sees tokens 0 and 1, which have equal keys here, so it gets their mean.
    bs, d = 8, 16
    q = jnp.ones((1, 1, 2, bs, d), jnp.float32)
    k = jnp.ones((1, 1, 2 * bs, d), jnp.float32)
    v = jnp.arange(2 * bs * d, dtype=jnp.float32).reshape(1, 1, 2 * bs, d)
    ids = jnp.asarray([[[[0, -1]]]], jnp.int32)
    for impl in ("reference", "pallas_interpret"):
        out = np.asarray(
            sparse_prefill_attention(q, k, v, ids, jnp.asarray([16], jnp.int32), block_size=bs, implementation=impl)
        )
        np.testing.assert_array_equal(out[0, 0, :, 0], np.broadcast_to(np.asarray(v)[0, 0, 0], (2, d)))
        np.testing.assert_allclose(out[0, 0, :, 1], np.broadcast_to(np.asarray(v)[0, 0, :2].mean(0), (2, d)))


def test_rows_with_nothing_valid_are_zero():
    # Query block 1 lists only a future block; query block 0 lists nothing; kv_len = 0 for the second sequence.
    bs, d = 8, 16
    rng = np.random.default_rng(4)
    q, k, v, _, _ = make_case(rng, 2, 1, 2, d, 2 * bs, 4 * bs, 0, 2, bs, jnp.float32)
    ids = jnp.asarray([[[[-1, -1], [3, -1]]], [[[0, -1], [0, 1]]]], jnp.int32)
    kv_len = jnp.asarray([4 * bs, 0], jnp.int32)
    for impl in ("reference", "pallas_interpret"):
        out = np.asarray(sparse_prefill_attention(q, k, v, ids, kv_len, block_size=bs, implementation=impl))
        assert np.all(out == 0.0), impl


# ----------------------------------------------------------------------------------------------------------------------
# kernel vs reference
# ----------------------------------------------------------------------------------------------------------------------
SWEEP = [
    # (b, h, g, d, tq, tk, q_start, n, bs, dtype, kv_len)
    (1, 2, 1, 64, 32, 48, 16, 2, 16, jnp.float32, (40,)),  # N below the number of KV blocks, ragged kv_len
    (2, 1, 3, 64, 32, 32, 0, 4, 16, jnp.bfloat16, (32, 20)),  # N = all blocks, G = 3
    (1, 1, 4, 128, 64, 128, 64, 3, 64, jnp.bfloat16, (128,)),  # the model's block size
    (1, 2, 4, 128, 32, 64, 32, 6, 16, jnp.float32, (64,)),  # N above the number of KV blocks (-1 tail)
    (1, 1, 16, 64, 32, 32, 0, 2, 16, jnp.bfloat16, (32,)),
]


@pytest.mark.parametrize("b,h,g,d,tq,tk,q_start,n,bs,dtype,kv_len", SWEEP)
def test_kernel_matches_reference(b, h, g, d, tq, tk, q_start, n, bs, dtype, kv_len):
    rng = np.random.default_rng(g * 100 + d + tq)
    q, k, v, ids, kvl = make_case(rng, b, h, g, d, tq, tk, q_start, n, bs, dtype, kv_len)
    ref = sparse_prefill_attention_reference(q, k, v, ids, kvl, q_start=q_start, block_size=bs)
    out = sparse_prefill_attention(q, k, v, ids, kvl, q_start=q_start, block_size=bs, implementation="pallas_interpret")
    assert out.dtype == dtype and out.shape == q.shape
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out32))
    np.testing.assert_allclose(out32, ref32, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize(
    "knobs",
    [
        dict(heads_per_program=1, id_source="preload"),
        dict(heads_per_program=2, id_source="loop", blocks_per_tile=2),
        dict(heads_per_program=2, id_source="prefetch", blocks_per_tile=2, num_warps=4),
    ],
)
def test_kernel_variants_and_traced_q_start(knobs):
    rng = np.random.default_rng(9)
    bs = 16
    q, k, v, ids, kvl = make_case(rng, 1, 2, 4, 64, 32, 64, 32, 5, bs, jnp.float32, (60,))
    ref = sparse_prefill_attention_reference(q, k, v, ids, kvl, q_start=32, block_size=bs)
    # q_start as a traced int32 scalar, as in a jitted chunked prefill
    run = jax.jit(
        lambda q0: sparse_prefill_attention(
            q, k, v, ids, kvl, q_start=q0, block_size=bs, implementation="pallas_interpret", **knobs
        )
    )
    out = run(jnp.int32(32))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=ATOL[jnp.float32], rtol=0)


def test_compact_block_ids():
    ids = jnp.asarray([[[[5, -1, 0, 3, 1], [2, 9, -1, 0, 1]]]], jnp.int32)  # 2 query blocks of 4, q_start 4
    kv_len = jnp.asarray([20], jnp.int32)
    out, counts = compact_block_ids(ids, kv_len, 4, 4)
    # query block 0 covers positions 4..7 (last block 1); query block 1 positions 8..11 (last block 2); kv_len 20
    np.testing.assert_array_equal(np.asarray(out)[0, 0], [[0, 1, -1, -1, -1], [0, 1, 2, -1, -1]])
    np.testing.assert_array_equal(np.asarray(counts)[0, 0], [2, 3])


def test_default_implementation_is_reference_on_cpu():
    rng = np.random.default_rng(2)
    q, k, v, ids, kvl = make_case(rng, 1, 1, 2, 16, 16, 16, 0, 2, 8, jnp.float32)
    assert jax.default_backend() != "gpu"
    np.testing.assert_array_equal(
        np.asarray(sparse_prefill_attention(q, k, v, ids, kvl, block_size=8)),
        np.asarray(sparse_prefill_attention_reference(q, k, v, ids, kvl, block_size=8, sm_scale=1 / math.sqrt(16))),
    )


# ----------------------------------------------------------------------------------------------------------------------
# argument checking
# ----------------------------------------------------------------------------------------------------------------------
def _good():
    return (
        jnp.zeros((1, 2, 2, 16, 16)),
        jnp.zeros((1, 2, 32, 16)),
        jnp.zeros((1, 2, 32, 16)),
        jnp.zeros((1, 2, 2, 3), jnp.int32),
        jnp.asarray([32], jnp.int32),
    )


@pytest.mark.parametrize(
    "index,bad,match",
    [
        (0, jnp.zeros((1, 2, 16, 16)), r"q must be \[B, KV, G, Tq, D\]"),
        (1, jnp.zeros((1, 2, 32)), r"k must be \[B, KV, Tk, D\]"),
        (2, jnp.zeros((1, 2, 24, 16)), "v shape"),
        (0, jnp.zeros((1, 2, 2, 12, 16)), "Tq=12 must be a multiple of block_size=8"),
        (3, jnp.zeros((1, 2, 3, 3), jnp.int32), "block_ids must be"),
        (3, jnp.zeros((1, 2, 2, 3), jnp.float32), "block_ids must be int32"),
        (4, jnp.asarray([32, 32], jnp.int32), r"kv_len must be \[B=1\]"),
        (4, jnp.asarray([32.0]), "kv_len must be int32"),
        (0, jnp.zeros((1, 2, 2, 16, 16), jnp.int32), "q must be float32, bfloat16 or float16"),
    ],
)
def test_bad_arguments_raise(index, bad, match):
    args = list(_good())
    args[index] = bad
    with pytest.raises(ValueError, match=match):
        sparse_prefill_attention(*args, block_size=8, implementation="pallas_interpret")
    with pytest.raises(ValueError, match=match):
        sparse_prefill_attention_reference(*args, block_size=8)


def test_bad_options_raise():
    q, k, v, ids, kvl = _good()
    with pytest.raises(ValueError, match="Tk=24 must be a multiple of block_size=16"):
        sparse_prefill_attention(
            jnp.zeros((1, 2, 2, 16, 16)),
            jnp.zeros((1, 2, 24, 16)),
            jnp.zeros((1, 2, 24, 16)),
            jnp.zeros((1, 2, 1, 3), jnp.int32),
            kvl,
            block_size=16,
        )
    with pytest.raises(ValueError, match="must share one dtype"):
        sparse_prefill_attention(q, k.astype(jnp.bfloat16), v, ids, kvl, block_size=8)
    with pytest.raises(ValueError, match="q_start must be an int"):
        sparse_prefill_attention(q, k, v, ids, kvl, q_start=1.5, block_size=8)
    with pytest.raises(ValueError, match="heads_per_program must be a power of two dividing G=2"):
        sparse_prefill_attention(
            q, k, v, ids, kvl, block_size=8, implementation="pallas_interpret", heads_per_program=4
        )
    with pytest.raises(ValueError, match="implementation must be one of"):
        sparse_prefill_attention(q, k, v, ids, kvl, block_size=8, implementation="triton")

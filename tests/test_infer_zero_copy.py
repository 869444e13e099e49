"""The zero-copy fill kernels (infer/zero_copy.py) in interpret mode against numpy, and their Triton lowering."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer.zero_copy import compact_misses, fill_slots, fill_slots_persistent

B, KV, P, S, D, ROWS = 2, 2, 6, 8, 16, 40


def _case(seed, n, misses):
    rng = np.random.default_rng(seed)
    host = rng.standard_normal((ROWS, 2 * S * D)).astype(np.float32)
    pool_k = rng.standard_normal((B, KV, P, S, D)).astype(np.float32)
    pool_v = rng.standard_normal((B, KV, P, S, D)).astype(np.float32)
    src = np.full(n, -1, np.int32)
    dst = np.full(n, -1, np.int32)
    picked = rng.choice(n, misses, replace=False)
    src[picked] = rng.choice(ROWS, misses, replace=False)
    dst[picked] = rng.choice(B * KV * P, misses, replace=False)
    return host, src, dst, pool_k, pool_v


def _expected(host, src, dst, pool_k, pool_v):
    k, v = pool_k.reshape(-1, S * D).copy(), pool_v.reshape(-1, S * D).copy()
    for s_, d_ in zip(src, dst):
        if s_ >= 0:
            k[d_], v[d_] = host[s_, :S * D], host[s_, S * D:]
    return k.reshape(pool_k.shape), v.reshape(pool_v.shape)


def test_compact_misses_keeps_order_and_counts():
    src = np.array([-1, 7, -1, -1, 3, 9, -1], np.int32)
    dst = np.array([-1, 0, -1, -1, 5, 2, -1], np.int32)
    s, d, count = jax.jit(compact_misses)(jnp.asarray(src), jnp.asarray(dst))
    np.testing.assert_array_equal(s, [7, 3, 9, -1, -1, -1, -1])
    np.testing.assert_array_equal(d, [0, 5, 2, -1, -1, -1, -1])
    assert count.tolist() == [3]


@pytest.mark.parametrize("n,misses", [(24, 0), (24, 5), (24, 24)])
@pytest.mark.parametrize("kernel", ["grid", "persistent"])
def test_fill_matches_numpy(kernel, n, misses):
    host, src, dst, pool_k, pool_v = _case(n + misses, n, misses)
    want_k, want_v = _expected(host, src, dst, pool_k, pool_v)
    args = [jnp.asarray(x) for x in (host, src, dst, pool_k, pool_v)]
    if kernel == "grid":
        got_k, got_v = fill_slots(*args, width=64, interpret=True)
    else:
        s, d, count = compact_misses(args[1], args[2])
        # 3 programs over up to 24 misses: each loops over every third one (and the count need not divide evenly)
        got_k, got_v = fill_slots_persistent(args[0], s, d, count, args[3], args[4], num_programs=3, width=64,
                                             interpret=True)
    np.testing.assert_array_equal(np.asarray(got_k), want_k)
    np.testing.assert_array_equal(np.asarray(got_v), want_v)


def test_persistent_fill_rejects_bad_shapes():
    host, src, dst, pool_k, pool_v = _case(0, 8, 2)
    with pytest.raises(ValueError, match="do not fit"):
        fill_slots_persistent(jnp.asarray(host[:, :-1]), jnp.asarray(src), jnp.asarray(dst), jnp.array([2]),
                              jnp.asarray(pool_k), jnp.asarray(pool_v), interpret=True)
    with pytest.raises(ValueError, match="num_programs"):
        fill_slots_persistent(jnp.asarray(host), jnp.asarray(src), jnp.asarray(dst), jnp.array([2]),
                              jnp.asarray(pool_k), jnp.asarray(pool_v), num_programs=0, interpret=True)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_fills_lower_to_triton(fake_h100, dtype):
    S_ = jax.ShapeDtypeStruct
    b, kvh, p, s, d, rows, n = 8, 2, 98, 64, 128, 4096, 8 * 2 * 96
    shapes = (S_((rows, 2 * s * d), dtype), S_((n,), jnp.int32), S_((n,), jnp.int32), S_((b, kvh, p, s, d), dtype),
              S_((b, kvh, p, s, d), dtype))

    def persistent(host, src, dst, pk, pv):
        return fill_slots_persistent(host, *compact_misses(src, dst), pk, pv)

    for fn in (fill_slots, persistent):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            txt = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in txt

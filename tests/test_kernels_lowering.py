"""The kernels lower to Triton IR for an H100 (no GPU needed): catches Triton-only constraints (power-of-two tensor
sizes, dot shapes) that interpret mode does not enforce.

The `fake_h100` fixture (conftest.py) fakes the GPU-info query of jax's Triton lowering.
"""

import warnings

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.sparse_decode import sparse_decode_attention
from pallas_kernels.sparse_prefill import sparse_prefill_attention


def _lower_for_cuda(fn, *shapes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


S = jax.ShapeDtypeStruct


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize(
    "shape,knobs",
    [
        ((8, 8, 4, 128, 512, 64, 512), {}),  # B, KV, G, D, P, S, N: decode at 32K
        ((2, 3, 3, 64, 17, 64, 9), dict(id_source="prefetch")),  # G padded to 16, ragged N
        ((1, 2, 16, 128, 40, 64, 33), dict(kv_prefetch=True, blocks_per_tile=2)),
        ((1, 1, 32, 96, 5, 64, 3), dict(id_source="loop")),  # head_dim padded to 128
    ],
)
def test_decode_lowers_to_triton(fake_h100, dtype, shape, knobs):
    b, h, g, d, p, s, n = shape
    txt = _lower_for_cuda(
        lambda *a: sparse_decode_attention(*a, implementation="pallas", **knobs),
        S((b, h, g, d), dtype),
        S((b, h, p, s, d), dtype),
        S((b, h, p, s, d), dtype),
        S((b, h, n), jnp.int32),
        S((b, h, n), jnp.int32),
    )
    assert "__gpu$xla.gpu.triton" in txt


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize(
    "shape,knobs",
    [
        ((1, 8, 4, 128, 512, 1024, 9), {}),  # B, KV, G, D, Tq, Tk, N
        ((1, 3, 3, 64, 128, 256, 3), dict(id_source="preload")),
        ((1, 1, 16, 128, 256, 256, 4), dict(heads_per_program=1, blocks_per_tile=2)),
    ],
)
def test_prefill_lowers_to_triton(fake_h100, dtype, shape, knobs):
    b, h, g, d, tq, tk, n = shape
    txt = _lower_for_cuda(
        lambda *a: sparse_prefill_attention(*a[:5], q_start=a[5], implementation="pallas", **knobs),
        S((b, h, g, tq, d), dtype),
        S((b, h, tk, d), dtype),
        S((b, h, tk, d), dtype),
        S((b, h, tq // 64, n), jnp.int32),
        S((b,), jnp.int32),
        S((), jnp.int32),
    )
    assert "__gpu$xla.gpu.triton" in txt

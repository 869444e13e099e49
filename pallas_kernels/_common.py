"""Helpers shared by the block-sparse attention kernels (not public API)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

# Finite "minus infinity" for masked logits and the initial running max. Finite so that differences of two masked
# values stay 0 (exp2(0) = 1) instead of producing inf - inf = NaN; every masked probability is forced to 0 with a
# `where`, so this value never reaches the output.
NEG_INF = -1e30
LOG2E = math.log2(math.e)

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
IMPLEMENTATIONS = ("pallas", "pallas_interpret", "reference")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def resolve_implementation(implementation: str | None) -> str:
    """None -> "pallas" when the default backend is a GPU, else "reference"."""
    if implementation is None:
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
    return implementation


def check_float(name: str, x) -> None:
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def check_int32(name: str, x) -> None:
    if jnp.dtype(x.dtype) != jnp.dtype(jnp.int32):
        raise ValueError(f"{name} must be int32, got {x.dtype}")


def dot_precision(dtype, interpret: bool):
    """16-bit operands: the default (tensor cores). float32 on the GPU: 3xTF32 (float32-level error on tensor cores;
    plain TF32 loses ~3 digits, IEEE float32 dots made a float32 8192-token forward ~240x slower than bf16 on an
    H100). Interpret mode: exact float32 (HIGHEST), which every backend implements."""
    if jnp.dtype(dtype) != jnp.dtype(jnp.float32):
        return None
    return jax.lax.Precision.HIGHEST if interpret else jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def num_sms() -> int:
    """Streaming multiprocessors of the default device (132 on an H100 SXM when the runtime does not say)."""
    try:
        count = getattr(jax.devices()[0], "core_count", None)
        if count:
            return int(count)
    except Exception:  # pragma: no cover - defensive: any backend oddity falls back to the H100 figure
        pass
    return 132


def pad_axis(x, axis: int, new_size: int, value=0):
    if x.shape[axis] == new_size:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, new_size - x.shape[axis])
    return jnp.pad(x, pads, constant_values=value)


def gather_rows(ref, rows, row_mask):
    """Masked row gather inside a kernel: `ref` [R, D], `rows` [T] int32 (in range), `row_mask` [T] bool -> [T, D].

    Masked-off rows are not read (no memory traffic) and come back as 0. Both dimensions are indexed by explicit integer
    arrays, a form that the Triton lowering (one pointer tensor, contiguous and 16-byte aligned along D, the result
    directly in the [T, D] shape the dot wants) and interpret mode (a plain gather) both support.
    """
    t = rows.shape[0]
    head_dim = ref.shape[1]
    shape = (t, head_dim)
    r = jnp.broadcast_to(rows[:, None], shape)
    c = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    mask = jnp.broadcast_to(row_mask[:, None], shape)
    return pltriton.load(ref.at[r, c], mask=mask, other=0)


def select_tile(table, t):
    """Row t of a small register-resident [n, k] int table, as [k], without a memory load (masked sum over rows).

    Used to walk a list of block ids that was loaded once before the loop, so that the addresses of the K/V gathers in
    step t depend on no load issued inside the loop (which lets Triton's software pipeliner prefetch them).
    """
    sel = jax.lax.broadcasted_iota(jnp.int32, table.shape, 0) == t
    return jnp.where(sel, table, 0).sum(axis=0)

"""Token sampling: greedy (temperature 0), temperature, top-k, top-p. Parameters are traced, so changing them
does not recompile the decode step."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from sparda_jax.errors import SpardaError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise SpardaError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SpardaError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SpardaError(f"top-p must be in (0, 1], got {self.top_p}")

    def as_arrays(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return (jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p))


def _ordered(x: jax.Array) -> jax.Array:
    """float32 -> int32 with the same order (negative floats order by reversed magnitude bits)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _bisect(lo: jax.Array, hi: jax.Array, go_up: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per row, narrows [lo, hi] (int32 [B, 1]) to adjacent values keeping go_up(lo) and not go_up(hi): 32 halvings
    cover the whole int32 range."""

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo & hi) + ((lo ^ hi) >> 1)  # floor((lo + hi) / 2) without int32 overflow
        up = go_up(mid)
        return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [B, V] -> the tempered logits (float32), -inf outside the top-k and top-p sets (temperature > 0).

    The top-k and top-p thresholds are found by bisection over the floats' order (each probe one compare-and-sum
    over the vocabulary), not by sorting it: XLA's GPU sort cannot run inside a CUDA graph, so a sort would make a
    multi-step decode program's loop return to the host every step."""
    logits = logits.astype(jnp.float32)
    order = _ordered(logits)
    lowest = jnp.min(order, axis=-1, keepdims=True)
    highest = jnp.max(order, axis=-1, keepdims=True)
    # top-k: keep logits >= the k-th largest, the largest value that at least k logits reach.
    kth, _ = _bisect(lowest, highest + 1, lambda t: jnp.sum(order >= t, axis=-1, keepdims=True) >= top_k)
    keep = jnp.where(top_k > 0, order >= kth, True)
    scaled = jnp.where(keep, logits / jnp.maximum(temperature, 1e-6), -jnp.inf)
    # top-p on the tempered, top-k-filtered distribution: keep the smallest prefix (in descending order) whose mass
    # reaches top_p, i.e. every logit from the smallest one whose larger logits hold less than top_p.
    probs = jax.nn.softmax(scaled, axis=-1)
    _, cutoff = _bisect(lowest - 1, highest,
                        lambda t: jnp.sum(jnp.where(order > t, probs, 0.0), axis=-1, keepdims=True) >= top_p)
    return jnp.where((top_p >= 1) | (order >= cutoff), scaled, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """logits: [B, V] -> [B] int32: greedy at temperature 0, else a draw from `filter_logits`."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p), axis=-1)
    return jnp.where(temperature > 0, sampled.astype(jnp.int32), greedy)

"""Token sampling: greedy (temperature 0), temperature, top-k, top-p. Parameters are traced, so changing them
does not recompile the decode step."""

from __future__ import annotations

import dataclasses

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


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """logits: [B, V] float32 -> [B] int32."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    # top-k: keep logits >= the k-th largest.
    kth = jnp.take_along_axis(ordered, jnp.clip(top_k - 1, 0, vocab - 1)[None, None].repeat(logits.shape[0], 0),
                              axis=-1)
    keep = jnp.where(top_k > 0, logits >= kth, True)
    scaled = jnp.where(keep, logits / jnp.maximum(temperature, 1e-6), -jnp.inf)
    # top-p on the tempered, top-k-filtered distribution: keep the smallest prefix whose mass reaches top_p.
    sorted_scaled = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_scaled, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_scaled, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    sampled = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)

"""A decode step's tokens, logits and counts at fixed device addresses.

XLA runs a jitted step as one CUDA graph (a "command buffer") and re-records the whole graph before a launch whenever
any buffer its commands touch has moved. A step that takes fresh tokens and returns fresh logits moves a few buffers
every call, so every step re-records: on the H200 (paper 8B shape, sparda-offload, 32K B=1; 1313 commands) the
`command_buffer_thunk` log showed "Updated command buffer in 1358-2687 μs" on every step, with 2-3 moved
allocations. Donated state keeps its address, so the step reads its tokens from a buffer written in place by
`load_into` and writes its logits and counts into donated buffers, which `copy_out` copies for the caller: two
tiny programs a step instead of a re-recorded graph.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


# keep_unused: the donated buffer is only overwritten; pruned as unused, its memory would not be reused.
@functools.partial(jax.jit, donate_argnums=0, keep_unused=True)
def load_into(buffer: jax.Array, value) -> jax.Array:
    """`value` (cast and reshaped to `buffer`'s dtype and shape) written into `buffer`'s memory, which is donated."""
    return jnp.asarray(value).astype(buffer.dtype).reshape(buffer.shape)


@jax.jit
def copy_out(*buffers: jax.Array) -> tuple[jax.Array, ...]:
    """Copies the caller may keep after the originals are donated to the next step."""
    return tuple(jnp.copy(b) for b in buffers)

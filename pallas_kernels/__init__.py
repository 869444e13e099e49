"""Pallas (Triton backend) GPU kernels for SparDA's block-sparse attention; see README.md, "GPU kernels"."""

# Importing the fuser registers a config value that is part of every jit cache key. Pallas imports it lazily while
# tracing the first kernel with block specs, so every function traced before that is traced and compiled again on
# its second call (the whole 32-layer fused decode step: a second compile of ~15 s). Importing it here fixes the key.
import jax.experimental.pallas.fuser  # noqa: F401

from pallas_kernels.sparse_decode import sparse_decode_attention, sparse_decode_attention_reference
from pallas_kernels.sparse_prefill import sparse_prefill_attention, sparse_prefill_attention_reference

__all__ = [
    "sparse_decode_attention",
    "sparse_decode_attention_reference",
    "sparse_prefill_attention",
    "sparse_prefill_attention_reference",
]

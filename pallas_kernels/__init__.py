"""Pallas (Triton backend) GPU kernels for SparDA's block-sparse attention; see README_SECTION.md."""

from pallas_kernels.sparse_decode import sparse_decode_attention, sparse_decode_attention_reference
from pallas_kernels.sparse_prefill import sparse_prefill_attention, sparse_prefill_attention_reference

__all__ = [
    "sparse_decode_attention",
    "sparse_decode_attention_reference",
    "sparse_prefill_attention",
    "sparse_prefill_attention_reference",
]

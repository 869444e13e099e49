"""With top-k >= the number of blocks, both sparse modes must be dense attention; with small k they must not be."""

import importlib.util
import inspect
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from sparda_jax.config import SparseConfig
from sparda_jax.generation import Generator
from sparda_jax.model import KVCache
from sparda_jax.sampling import SamplingConfig

PROMPT_TOKENS = 1700


@pytest.fixture(scope="module")
def long_prompt_ids(smollm2_tokenizer):
    """~1,700 tokens of English prose: the docstrings of a few standard-library modules (no download needed)."""
    text = ""
    for name in ("argparse", "json", "collections", "functools", "pathlib", "logging", "subprocess", "threading"):
        spec = importlib.util.find_spec(name)
        text += inspect.getdoc(__import__(name)) or Path(spec.origin).read_text()[:4000]
        text += "\n\n"
    ids = smollm2_tokenizer.encode(text)
    assert len(ids) >= PROMPT_TOKENS
    return ids[:PROMPT_TOKENS]


def prefill_logits(model, ids, mode, sparse):
    padded = -(-len(ids) // 64) * 64
    tokens = jnp.zeros((1, padded), jnp.int32).at[0, : len(ids)].set(jnp.asarray(ids))
    cache = KVCache.create(model.config, sparse, 1, padded, jnp.float32)
    logits, _ = model(tokens, cache, mode=mode, sparse=sparse, lengths=jnp.asarray([len(ids)]), all_logits=True)
    return np.asarray(logits[0, : len(ids)])


def test_sparse_with_all_blocks_generates_the_dense_tokens(smollm2_model, long_prompt_ids):
    everything = SparseConfig(top_k_blocks=100_000)
    dense = Generator(smollm2_model, everything, "dense").generate(
        long_prompt_ids, max_new_tokens=8, sampling=SamplingConfig())
    for mode in ("sparse", "sparda"):
        sparse = Generator(smollm2_model, everything, mode).generate(
            long_prompt_ids, max_new_tokens=8, sampling=SamplingConfig())
        assert sparse.token_ids == dense.token_ids, mode


def test_prefill_logits_equal_dense_only_when_every_block_is_kept(smollm2_model, long_prompt_ids):
    dense = prefill_logits(smollm2_model, long_prompt_ids, "dense", SparseConfig())
    every = prefill_logits(smollm2_model, long_prompt_ids, "sparse", SparseConfig(top_k_blocks=100_000))
    np.testing.assert_allclose(every, dense, rtol=1e-4, atol=1e-3)
    # 1,700 tokens are 27 blocks; keeping 8 of them must change late positions' logits.
    few = prefill_logits(smollm2_model, long_prompt_ids, "sparse", SparseConfig(top_k_blocks=8, local_blocks=2))
    assert np.abs(few[-256:] - dense[-256:]).max() > 1e-2
    # ...but not the first blocks, where 8 blocks are everything there is.
    np.testing.assert_allclose(few[:8 * 64], dense[:8 * 64], rtol=1e-4, atol=1e-3)

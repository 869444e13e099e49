"""eval_forecast's measurements checked against the model itself: per-token perplexity equals one decode step per
token, dense is dense either way, and with k covering every block all modes agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparda_jax.config import ModelConfig, SparseConfig
from sparda_jax.model import ForecastParam, KVCache, Transformer
from train import eval_forecast as E

CONFIG = ModelConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                     head_dim=8, max_context=1024)
SPARSE = SparseConfig(top_k_blocks=4, local_blocks=1)
T = 512


@pytest.fixture(scope="module")
def model():
    return Transformer(CONFIG, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def tokens():
    return np.asarray(jax.random.randint(jax.random.key(4), (1, T), 0, CONFIG.vocab_size), np.int32)


def _decode_nll(model, tokens, mode):
    """One decode step per token through the model's own decode path: the ground truth for per-token selection."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, token, cache):
        return nnx.merge(graphdef, state)(token, cache, mode=mode, sparse=SPARSE)

    cache = KVCache.create(CONFIG, SPARSE, 1, T, jnp.float32)
    total = 0.0
    for t in range(T - 1):
        logits, cache = step(state, jnp.asarray(tokens[:, t: t + 1]), cache)
        total -= float(jax.nn.log_softmax(logits[0])[tokens[0, t + 1]])
    return total


@pytest.mark.parametrize("mode", ["sparse", "sparda"])
def test_per_token_nll_equals_decoding_token_by_token(model, tokens, mode):
    fn = E.make_nll_fn(model, SPARSE, "per_token")
    nll, count = fn(nnx.state(model, ForecastParam), tokens, mode)
    assert int(count) == T - 1
    assert float(nll) == pytest.approx(_decode_nll(model, tokens, mode), rel=1e-4)


def test_dense_is_the_same_both_ways_and_large_k_makes_every_mode_dense(model, tokens):
    forecast = nnx.state(model, ForecastParam)
    prefill, per_token = E.make_nll_fn(model, SPARSE, "prefill"), E.make_nll_fn(model, SPARSE, "per_token")
    dense = float(prefill(forecast, tokens, "dense")[0])
    assert float(per_token(forecast, tokens, "dense")[0]) == pytest.approx(dense, rel=1e-5)
    assert float(per_token(forecast, tokens, "sparse")[0]) != pytest.approx(dense, rel=1e-5)  # k=4 of 8 is sparse
    wide = SparseConfig(top_k_blocks=T // 64, local_blocks=1)
    wide_fn = E.make_nll_fn(model, wide, "per_token")
    for mode in ("sparse", "sparda"):
        assert float(wide_fn(forecast, tokens, mode)[0]) == pytest.approx(dense, rel=1e-5)


def test_recall_counts_per_layer(model, tokens):
    forecast = nnx.state(model, ForecastParam)
    counts = E.make_recall_fn(model, SPARSE, min_position=256)({"forecast": forecast, "query_mean": forecast},
                                                               tokens)
    hits, totals = (np.asarray(x) for x in counts["forecast"])
    assert hits.shape == totals.shape == (CONFIG.num_layers,)
    assert np.array_equal(hits, np.asarray(counts["query_mean"][0]))
    # From position 256 (block 4) on: block 4 has 2 candidates for 1 non-forced slot, blocks 5-7 have 3-5.
    # Each (KV head, position) has exactly one non-forced teacher block: total = KV heads * 256 positions.
    assert totals.tolist() == [CONFIG.num_kv_heads * 256] * CONFIG.num_layers
    assert np.all(hits <= totals)
    reuse_hits, reuse_totals = (np.asarray(x) for x in counts["reuse"])
    assert reuse_totals[0] == 0 and reuse_totals[1:].tolist() == totals[1:].tolist()

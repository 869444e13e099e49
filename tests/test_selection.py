"""Selection math (SPARDA.md §2-3) on tiny cases whose answers are worked out by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from sparda_jax import selection
from sparda_jax.config import SparseConfig
from sparda_jax.errors import SpardaError

CFG = SparseConfig(block_size=64, compress_kernel=32, compress_stride=16, top_k_blocks=4, local_blocks=1)


def test_compressed_keys_are_means_of_32_tokens_every_16():
    k = jnp.arange(64, dtype=jnp.float32)[:, None]  # key value = its position
    kc = selection.compress_keys(k, CFG)
    # Kc[c] = mean(16c .. 16c+31) = 16c + 15.5; three keys are complete at 64 tokens.
    np.testing.assert_allclose(np.asarray(kc[:, 0]), [15.5, 31.5, 47.5])


def test_no_compressed_key_before_32_tokens():
    assert selection.compress_keys(jnp.ones((31, 4)), CFG).shape == (0, 4)


def test_latest_compressed_key_matches_full_compression():
    rng = np.random.default_rng(0)
    k = rng.normal(size=(2, 128, 4)).astype(np.float32)
    full = np.asarray(selection.compress_keys(jnp.asarray(k), CFG))
    for position in (31, 47, 95, 127):
        index, value = selection.latest_compressed_key(jnp.asarray(k), jnp.int32(position), CFG)
        assert int(index) == (position + 1 - 32) // 16
        np.testing.assert_allclose(np.asarray(value), k[:, 16 * int(index): 16 * int(index) + 32].mean(1),
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(value), full[:, int(index)], rtol=1e-5, atol=1e-7)


def test_visibility_counts_keys_complete_before_the_token():
    positions = jnp.asarray([0, 31, 32, 47, 48, 64, 100])
    # A key c is visible at t when 16c + 32 <= t.
    assert selection.num_visible_compressed(positions, CFG).tolist() == [0, 0, 1, 1, 2, 3, 5]


def test_block_scores_pool_the_overlapping_compressed_keys():
    s = jnp.asarray([1.0, 5.0, 2.0, 3.0, 0.0, 4.0, -1.0, 7.0, 9.0])
    # Block j pools keys [4j-1, 4j+3]: block 0 -> s[0..3], block 1 -> s[3..7], block 2 -> s[7..8] (the rest absent).
    assert selection.block_scores(s, 3, CFG).tolist() == [5.0, 7.0, 9.0]


def test_block_scores_ignore_invisible_keys():
    s = jnp.asarray([1.0, 2.0, -jnp.inf, -jnp.inf])
    assert selection.block_scores(s, 2, CFG).tolist() == [2.0, -jnp.inf]


def test_query_selector_is_group_sum_of_softmax_over_visible_keys():
    # One KV group of two heads, three compressed keys, D = 4, the token at position 64 sees all three keys.
    q = np.array([[1.0, 0, 0, 0], [0, 2.0, 0, 0]])
    kc = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    s = selection.query_selector_scores(jnp.asarray(q)[None, None, :, None], jnp.asarray(kc)[None, None],
                                        jnp.asarray([[64]]), CFG)
    logits = q @ kc.T / 2.0  # 1/sqrt(4)
    expected = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).sum(0)
    np.testing.assert_allclose(np.asarray(s[0, 0, 0]), expected, rtol=1e-6)
    # At position 47 only the first key is visible: each head puts all its mass there.
    s = selection.query_selector_scores(jnp.asarray(q)[None, None, :, None], jnp.asarray(kc)[None, None],
                                        jnp.asarray([[47]]), CFG)
    assert np.asarray(s[0, 0, 0]).tolist() == [2.0, -np.inf, -np.inf]


def test_forecast_scores_are_raw_dot_products():
    f = jnp.asarray([[3.0, -1.0]])[None, None]  # [B=1, KV=1, T=1, D=2]
    kc = jnp.asarray([[1.0, 1.0], [2.0, 0.0], [0.0, 5.0]])[None, None]
    s = selection.forecast_scores(f, kc, jnp.asarray([[64]]), CFG)
    assert np.asarray(s[0, 0, 0]).tolist() == [2.0, 6.0, -5.0]


def test_select_blocks_forces_sink_and_local_window_then_best_scores():
    scores = jnp.asarray([0.0, 5.0, 1.0, 9.0, 2.0, 0.5, -3.0, 0.0])
    ids = selection.select_blocks(scores, jnp.int32(7), CFG)  # k = 4, local 1: forced {0, 6, 7}
    assert sorted(ids.tolist()) == [0, 3, 6, 7]


def test_select_blocks_never_picks_future_blocks_and_pads_with_minus_one():
    scores = jnp.asarray([0.0, 5.0, 1.0, 9.0, 99.0, 99.0])
    cfg = SparseConfig(top_k_blocks=100, local_blocks=1)
    ids = selection.select_blocks(scores, jnp.int32(2), cfg)
    assert sorted(i for i in ids.tolist() if i >= 0) == [0, 1, 2]
    assert ids.tolist().count(-1) == 3  # k is capped at the number of blocks


def test_select_blocks_keeps_unscored_visible_blocks_above_future_ones():
    scores = jnp.asarray([-jnp.inf, -jnp.inf, -jnp.inf, 4.0])
    cfg = SparseConfig(top_k_blocks=3, local_blocks=0)
    ids = selection.select_blocks(scores, jnp.int32(2), cfg)
    assert sorted(ids.tolist()) == [0, 1, 2]


def test_prefill_selection_shares_the_best_score_of_each_query_block():
    token_scores = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2 * 4, 3)  # T = 8 tokens, 3 blocks
    pooled = selection.pool_query_blocks(token_scores, 4)
    assert pooled.tolist() == [[9.0, 10.0, 11.0], [21.0, 22.0, 23.0]]


def test_sparse_config_rejects_k_smaller_than_the_forced_blocks():
    with pytest.raises(SpardaError, match="forced"):
        SparseConfig(top_k_blocks=4, local_blocks=4)

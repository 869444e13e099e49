"""Sampling: greedy, temperature, top-k, top-p, seeds; checked against the distributions they should draw from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparda_jax.errors import SpardaError
from sparda_jax.sampling import SamplingConfig, filter_logits, sample

LOGITS = jnp.log(jnp.asarray([[0.4, 0.35, 0.15, 0.1]]))


def draw(config, n=4000, logits=LOGITS, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    fn = jax.jit(jax.vmap(lambda k: sample(logits, k, *config.as_arrays())[0]))
    return np.asarray(fn(keys))


def test_temperature_zero_is_argmax():
    logits = jnp.asarray([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    out = sample(logits, jax.random.key(3), *SamplingConfig(temperature=0.0).as_arrays())
    assert out.tolist() == [1, 0]


def test_temperature_one_draws_from_the_softmax():
    counts = np.bincount(draw(SamplingConfig(temperature=1.0)), minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.4, 0.35, 0.15, 0.1], atol=0.03)


def test_temperature_sharpens():
    # T = 0.5 squares the probabilities before renormalising.
    p = np.array([0.4, 0.35, 0.15, 0.1]) ** 2
    counts = np.bincount(draw(SamplingConfig(temperature=0.5)), minlength=4) / 4000
    np.testing.assert_allclose(counts, p / p.sum(), atol=0.03)


def test_top_k_keeps_only_the_k_best():
    counts = np.bincount(draw(SamplingConfig(temperature=1.0, top_k=2)), minlength=4) / 4000
    assert counts[2] == counts[3] == 0
    np.testing.assert_allclose(counts[:2], [0.4 / 0.75, 0.35 / 0.75], atol=0.03)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # Mass before token 1 is 0.4 < 0.5, so tokens 0 and 1 stay; token 2 starts at 0.75.
    counts = np.bincount(draw(SamplingConfig(temperature=1.0, top_p=0.5)), minlength=4) / 4000
    assert counts[2] == counts[3] == 0
    np.testing.assert_allclose(counts[:2], [0.4 / 0.75, 0.35 / 0.75], atol=0.03)
    counts = np.bincount(draw(SamplingConfig(temperature=1.0, top_p=0.3)), minlength=4)
    assert counts[0] == 4000


def test_same_seed_same_samples_other_seed_other_samples():
    config = SamplingConfig(temperature=1.0)
    assert (draw(config, 50, seed=1) == draw(config, 50, seed=1)).all()
    assert (draw(config, 50, seed=1) != draw(config, 50, seed=2)).any()


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)])
def test_bad_settings_are_clear_errors(kwargs):
    with pytest.raises(SpardaError):
        SamplingConfig(**kwargs)


def reference_kept(logits, temperature, top_k, top_p):
    """numpy, by sorting: the tokens top-k then top-p (on the tempered distribution) keep."""
    keep = np.ones(logits.shape, bool)
    if top_k:
        keep = logits >= np.sort(logits)[::-1][top_k - 1]
    scaled = np.where(keep, logits / temperature, -np.inf)
    p = np.exp(scaled - scaled.max())
    p /= p.sum()
    order = np.argsort(-scaled, kind="stable")
    mass_before = np.cumsum(p[order]) - p[order]
    cutoff = scaled[order][mass_before < top_p].min()
    return keep & (scaled >= cutoff) if top_p < 1 else keep


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.9), (0.7, 50, 1.0), (1.3, 20, 0.5), (0.8, 0, 0.05),
                                                     (1.0, 1, 0.9), (2.0, 500, 0.99)])
def test_filter_matches_a_sorting_reference(temperature, top_k, top_p):
    # Rounded logits so that ties, also at the k-th value and the top-p cutoff, occur; one row has -inf entries.
    rng = np.random.default_rng(top_k)
    logits = np.round(rng.normal(0, 3, (4, 3000)), 1).astype(np.float32)
    logits[1, ::7] = -np.inf
    got = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), *SamplingConfig(temperature, top_k,
                                                                                    top_p).as_arrays())))
    for row, kept in zip(logits, got):
        want = reference_kept(row, temperature, top_k, top_p)
        assert kept.sum() > 0 and (kept == want).all(), (kept.sum(), want.sum())

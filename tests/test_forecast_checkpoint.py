"""Forecast-only checkpoints: round trip, clear errors on mismatched models, no half-written directories."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from sparda_jax import forecast_checkpoint
from sparda_jax.config import ModelConfig
from sparda_jax.errors import SpardaError
from sparda_jax.model import ForecastParam, Transformer

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                   head_dim=8, max_context=256)


def tiny_model(seed, config=TINY):
    return Transformer(config, rngs=nnx.Rngs(seed))


def forecast_leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, ForecastParam))]


def other_leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Not(ForecastParam)))]


def test_round_trip_restores_forecast_weights_only(tmp_path):
    trained, fresh = tiny_model(1), tiny_model(2)
    forecast_checkpoint.save_forecast(trained, tmp_path / "fc", {"steps": 7})
    before = other_leaves(fresh)
    meta = forecast_checkpoint.load_forecast(fresh, tmp_path / "fc")
    assert meta == {"steps": 7}
    for a, b in zip(forecast_leaves(trained), forecast_leaves(fresh), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(before, other_leaves(fresh), strict=True):
        np.testing.assert_array_equal(a, b)
    # 3 Forecast projections + layer 0's q_select, hidden -> KV * D each.
    assert fresh.forecast_parameter_count() == 4 * 32 * 16


def test_checkpoint_for_another_model_shape_is_a_clear_error(tmp_path):
    forecast_checkpoint.save_forecast(tiny_model(1), tmp_path / "fc")
    other = tiny_model(1, dataclasses.replace(TINY, num_layers=2))
    with pytest.raises(SpardaError, match="was made for a model shaped"):
        forecast_checkpoint.load_forecast(other, tmp_path / "fc")


def test_directory_without_metadata_is_a_clear_error(tmp_path):
    with pytest.raises(SpardaError, match="not a Forecast checkpoint"):
        forecast_checkpoint.load_forecast(tiny_model(0), tmp_path)


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(forecast_checkpoint.Path, "write_text", explode)
    with pytest.raises(OSError):
        forecast_checkpoint.save_forecast(tiny_model(0), tmp_path / "fc")
    assert list(tmp_path.iterdir()) == []

"""The trained Forecast shipped for SmolLM2-135M-Instruct: found by default, loads, and is not the training-free
init."""

import numpy as np

from sparda_jax.forecast_checkpoint import default_forecast_for, forecast_arrays, load_forecast, read_forecast_metadata
from sparda_jax.model import build_model


def test_shipped_forecast_loads_into_the_default_model(smollm2_checkpoint):
    directory = default_forecast_for(smollm2_checkpoint.path)
    assert directory is not None and directory.name == "smollm2-135m-instruct"
    meta = read_forecast_metadata(directory)["metadata"]
    assert meta["init"] == "query_mean" and meta["steps"] > 0 and meta["top_k_blocks"] == 16
    model = build_model(smollm2_checkpoint.weights, smollm2_checkpoint.config)
    init = forecast_arrays(model)
    load_forecast(model, directory)
    trained = forecast_arrays(model)
    assert trained.keys() == init.keys() and len(trained) == smollm2_checkpoint.config.num_layers + 1
    for key, value in trained.items():
        assert value.shape == init[key].shape and np.isfinite(value).all()
    # Training moved every Forecast that has a target (the last layer's forecasts nothing), but not far from init.
    last = f"layers/{smollm2_checkpoint.config.num_layers - 1}/attn/forecast/kernel"
    for key in trained:
        if key != last:
            change = np.linalg.norm(trained[key] - init[key]) / np.linalg.norm(init[key])
            assert 1e-3 < change < 1.0, (key, change)

"""Save and load the Forecast weights alone (every `ForecastParam`): a few MB instead of the whole model.

Layout of a Forecast directory: `params/` (an Orbax checkpoint of the float32 arrays) and `forecast.json` (the model
shape it belongs to, plus free-form training metadata). Writes go to a temporary sibling that is renamed into place,
so an interrupted save never leaves a half-written directory behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparda_jax.errors import SpardaError
from sparda_jax.model import ForecastParam, Transformer

META_FILE = "forecast.json"
PARAMS_DIR = "params"
# Trained Forecasts shipped with the package, keyed by the file name of the model they were trained for.
_SHIPPED = {"SmolLM2-135M-Instruct.Q4_1.gguf": "smollm2-135m-instruct"}


def _shape_signature(model: Transformer) -> dict[str, int]:
    c = model.config
    return {"num_layers": c.num_layers, "hidden_size": c.hidden_size, "num_kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim}


def forecast_arrays(model: Transformer) -> dict[str, np.ndarray]:
    """Flat {path: float32 array} view of the model's Forecast parameters."""
    flat = nnx.to_flat_state(nnx.state(model, ForecastParam))
    return {"/".join(str(p) for p in path): np.asarray(var[...], np.float32) for path, var in flat}


def save_forecast(model: Transformer, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, forecast_arrays(model))
        meta = {"model": _shape_signature(model), "metadata": metadata or {}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_forecast_metadata(directory: str | Path) -> dict[str, Any]:
    meta_file = Path(directory) / META_FILE
    try:
        return json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise SpardaError(f"{directory} is not a Forecast checkpoint (no {META_FILE})") from None
    except json.JSONDecodeError as e:
        raise SpardaError(f"corrupt Forecast metadata {meta_file}: {e}") from None


def load_forecast(model: Transformer, directory: str | Path) -> dict[str, Any]:
    """Loads Forecast weights into `model` in place; returns the checkpoint's metadata."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    meta = read_forecast_metadata(directory)
    expected = _shape_signature(model)
    if meta.get("model") != expected:
        raise SpardaError(f"Forecast checkpoint {directory} was made for a model shaped {meta.get('model')}, "
                          f"but this model is {expected}")
    current = forecast_arrays(model)
    target = {k: jax.ShapeDtypeStruct(v.shape, jnp.float32) for k, v in current.items()}
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(directory / PARAMS_DIR, target)
    except Exception as e:  # orbax raises a zoo of types for missing/corrupt/mismatched trees
        raise SpardaError(f"cannot restore Forecast weights from {directory}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
    flat = nnx.to_flat_state(nnx.state(model, ForecastParam))
    for path, var in flat:
        key = "/".join(str(p) for p in path)
        value = np.asarray(restored[key])
        if value.shape != tuple(var.shape):
            raise SpardaError(f"Forecast checkpoint {directory}: {key} has shape {value.shape}, "
                              f"expected {tuple(var.shape)}")
        var.set_value(jnp.asarray(value, dtype=var[...].dtype))
    return meta.get("metadata", {})


def shipped_forecast_dir(name: str) -> Path:
    return Path(__file__).parent / "assets" / "forecast" / name


def default_forecast_for(model_path: str | Path) -> Path | None:
    """The trained Forecast that ships for this model file, if there is one."""
    name = _SHIPPED.get(Path(model_path).name)
    if name is None:
        return None
    directory = shipped_forecast_dir(name)
    return directory if (directory / META_FILE).exists() else None

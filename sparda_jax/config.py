"""Model and sparsity configuration: plain frozen dataclasses, built from GGUF metadata or an HF config.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from sparda_jax.errors import SpardaError

AttentionMode = Literal["dense", "sparse", "sparda"]
ATTENTION_MODES: tuple[str, ...] = ("dense", "sparse", "sparda")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style frequency scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope_scaling: RopeScaling | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise SpardaError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "ModelConfig":
        arch = meta.get("general.architecture")
        if arch not in ("llama", "qwen2"):
            raise SpardaError(f"unsupported GGUF architecture {arch!r} (supported: llama, qwen2)")

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise SpardaError(f"GGUF metadata lacks {arch}.{key}")
            return value

        hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
        if not vocab:
            raise SpardaError("GGUF metadata has neither a vocab size nor a token list")
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=int(get("rope.dimension_count", hidden // heads)),
            max_context=int(get("context_length")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            # Tied-ness is decided by the loader (GGUF omits output.weight when tied); qwen2 carries q/k/v biases.
            attention_bias=arch == "qwen2",
        )

    @classmethod
    def from_hf_config(cls, path: str | Path) -> "ModelConfig":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SpardaError(f"cannot read HF config {path}: {e}") from None
        if raw.get("model_type") not in ("llama", "qwen2", "mistral", None):
            raise SpardaError(f"unsupported model_type {raw.get('model_type')!r} in {path}")
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            scaling = raw.get("rope_scaling")
            rope_scaling = None
            if scaling:
                kind = scaling.get("rope_type", scaling.get("type"))
                if kind == "llama3":
                    rope_scaling = RopeScaling(
                        float(scaling["factor"]), float(scaling["low_freq_factor"]),
                        float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
                elif kind not in (None, "default"):
                    raise SpardaError(f"unsupported rope_scaling type {kind!r} in {path}")
            return cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                max_context=int(raw.get("max_position_embeddings", 4096)),
                rope_theta=float(raw.get("rope_theta", 10000.0)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", raw.get("model_type") == "qwen2")),
                rope_scaling=rope_scaling,
            )
        except KeyError as e:
            raise SpardaError(f"HF config {path} lacks {e.args[0]!r}") from None


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """Block selection hyperparameters (SPARDA.md §2). Paper defaults for 8B at long context: top_k 96, local 32."""

    block_size: int = 64
    compress_kernel: int = 32
    compress_stride: int = 16
    top_k_blocks: int = 16
    local_blocks: int = 4

    def __post_init__(self):
        if self.block_size % self.compress_stride or self.compress_kernel % self.compress_stride:
            raise SpardaError("block_size and compress_kernel must be multiples of compress_stride")
        if self.local_blocks < 0:
            raise SpardaError(f"local_blocks must be >= 0, got {self.local_blocks}")
        if self.top_k_blocks < self.local_blocks + 2:
            raise SpardaError(
                f"top_k_blocks ({self.top_k_blocks}) must cover the forced blocks: the sink, the current block and "
                f"local_blocks ({self.local_blocks}), i.e. be >= {self.local_blocks + 2}")

    @property
    def compressed_per_block(self) -> int:
        return self.block_size // self.compress_stride

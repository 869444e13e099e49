"""The JAX model on the real SmolLM2 weights vs an independent numpy forward pass written here.

The numpy pass reads the GGUF itself and uses llama.cpp's convention (raw GGUF Q/K rows with adjacent-pair RoPE),
while the project un-permutes Q/K and uses rotate-half RoPE: agreement proves the permutation handling.
"""

import numpy as np
import pytest

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
]


class NumpyLlama:
    def __init__(self, path):
        import gguf

        reader = gguf.GGUFReader(str(path))
        meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("llama.")}
        self.n_layers = meta["llama.block_count"]
        self.n_heads = meta["llama.attention.head_count"]
        self.n_kv = meta["llama.attention.head_count_kv"]
        self.eps = meta["llama.attention.layer_norm_rms_epsilon"]
        self.theta = meta["llama.rope.freq_base"]
        self.w = {}
        for t in reader.tensors:
            shape = tuple(reversed([int(d) for d in t.shape]))
            self.w[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)
        self.hd = self.w["blk.0.attn_q.weight"].shape[0] // self.n_heads

    def rms(self, x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * g

    def rope_adjacent(self, x):  # x: [T, n, hd]; rotates pairs (2i, 2i+1)
        t = np.arange(x.shape[0])[:, None]
        inv = self.theta ** (-np.arange(0, self.hd, 2) / self.hd)
        ang = t * inv[None]
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    def logits(self, ids):
        w, T = self.w, len(ids)
        x = w["token_embd.weight"][ids]
        mask = np.triu(np.full((T, T), -np.inf), 1)
        group = self.n_heads // self.n_kv
        for i in range(self.n_layers):
            p = f"blk.{i}."
            h = self.rms(x, w[p + "attn_norm.weight"])
            q = self.rope_adjacent((h @ w[p + "attn_q.weight"].T).reshape(T, self.n_heads, self.hd))
            k = self.rope_adjacent((h @ w[p + "attn_k.weight"].T).reshape(T, self.n_kv, self.hd))
            v = (h @ w[p + "attn_v.weight"].T).reshape(T, self.n_kv, self.hd)
            heads = []
            for hh in range(self.n_heads):
                s = q[:, hh] @ k[:, hh // group].T / np.sqrt(self.hd) + mask
                s = np.exp(s - s.max(-1, keepdims=True))
                heads.append((s / s.sum(-1, keepdims=True)) @ v[:, hh // group])
            x = x + np.concatenate(heads, -1) @ w[p + "attn_output.weight"].T
            h = self.rms(x, w[p + "ffn_norm.weight"])
            gate = h @ w[p + "ffn_gate.weight"].T
            x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        return self.rms(x, w["output_norm.weight"]) @ w["token_embd.weight"].T

    def greedy(self, ids, n):
        ids = list(ids)
        out = []
        for _ in range(n):
            nxt = int(np.argmax(self.logits(ids)[-1]))
            out.append(nxt)
            ids.append(nxt)
        return out


@pytest.fixture(scope="module")
def numpy_model(smollm2_checkpoint):
    return NumpyLlama(smollm2_checkpoint.path)


def _jax_all_logits(model, ids):
    import jax.numpy as jnp

    from sparda_jax.config import SparseConfig
    from sparda_jax.model import KVCache

    sparse = SparseConfig()
    padded = -(-len(ids) // 64) * 64
    tokens = jnp.zeros((1, padded), jnp.int32).at[0, : len(ids)].set(jnp.asarray(ids))
    cache = KVCache.create(model.config, sparse, 1, padded, jnp.float32)
    logits, _ = model(tokens, cache, mode="dense", sparse=sparse, lengths=jnp.asarray([len(ids)]), all_logits=True)
    return np.asarray(logits[0, : len(ids)])


def test_logits_match_numpy_reference(smollm2_model, smollm2_tokenizer, numpy_model):
    ids = smollm2_tokenizer.encode(PROMPTS[2])
    expected = numpy_model.logits(ids)
    got = _jax_all_logits(smollm2_model, ids)
    assert got.shape == expected.shape
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() < 2e-4 * scale, np.abs(got - expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_greedy_continuations_match_numpy_reference(smollm2_model, smollm2_tokenizer, numpy_model):
    from sparda_jax.config import SparseConfig
    from sparda_jax.generation import Generator
    from sparda_jax.sampling import SamplingConfig

    generator = Generator(smollm2_model, SparseConfig(), mode="dense")
    for prompt in PROMPTS:
        ids = smollm2_tokenizer.encode(prompt)
        result = generator.generate(ids, max_new_tokens=6, sampling=SamplingConfig())
        assert result.token_ids == numpy_model.greedy(ids, 6), prompt
    # Prompts under 64 tokens share one bucket: one prefill and one decode executable serve all of them.
    assert len(generator._compiled) == 1


def test_knows_the_capital_of_france(smollm2_model, smollm2_tokenizer):
    from sparda_jax.config import SparseConfig
    from sparda_jax.generation import Generator
    from sparda_jax.sampling import SamplingConfig

    ids = smollm2_tokenizer.encode(PROMPTS[0])
    result = Generator(smollm2_model, SparseConfig(), mode="dense").generate(
        ids, max_new_tokens=3, sampling=SamplingConfig())
    assert smollm2_tokenizer.decode(result.token_ids).startswith(" Paris")

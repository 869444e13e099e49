"""Loaders on checkpoints the tests write themselves: HF safetensors (plain and sharded) and GGUF (F32/F16/Q8_0)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from sparda_jax.config import SparseConfig
from sparda_jax.errors import SpardaError
from sparda_jax.model import KVCache, build_model
from sparda_jax.weights import load_checkpoint

HF_CONFIG = {
    "model_type": "llama", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 256,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}


def hf_weights(seed=0, config=HF_CONFIG):
    rng = np.random.default_rng(seed)
    c = config
    h, f, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    nq, nkv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    w = {"model.embed_tokens.weight": rng.normal(size=(c["vocab_size"], h)),
         "model.norm.weight": 1 + 0.1 * rng.normal(size=h),
         "lm_head.weight": rng.normal(size=(c["vocab_size"], h)) * 0.2}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": 1 + 0.1 * rng.normal(size=h),
              p + "post_attention_layernorm.weight": 1 + 0.1 * rng.normal(size=h),
              p + "self_attn.q_proj.weight": rng.normal(size=(nq, h)) * 0.3,
              p + "self_attn.k_proj.weight": rng.normal(size=(nkv, h)) * 0.3,
              p + "self_attn.v_proj.weight": rng.normal(size=(nkv, h)) * 0.3,
              p + "self_attn.o_proj.weight": rng.normal(size=(h, nq)) * 0.3,
              p + "mlp.gate_proj.weight": rng.normal(size=(f, h)) * 0.3,
              p + "mlp.up_proj.weight": rng.normal(size=(f, h)) * 0.3,
              p + "mlp.down_proj.weight": rng.normal(size=(h, f)) * 0.3}
    return {k: v.astype(np.float32) for k, v in w.items()}


def numpy_forward_hf(w, ids, c=HF_CONFIG):
    """HF Llama semantics written out: rotate-half RoPE, GQA, SwiGLU."""
    hd, nh, nkv, eps = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    T = len(ids)
    rms = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g  # noqa: E731
    inv = c["rope_theta"] ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
    rot = lambda x: np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], -1)  # noqa: E731
    x = w["model.embed_tokens.weight"][ids].astype(np.float64)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        out = np.zeros((T, nh, hd))
        for head in range(nh):
            s = q[:, head] @ k[:, head * nkv // nh].T / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
            pr = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (pr / pr.sum(-1, keepdims=True)) @ v[:, head * nkv // nh]
        x = x + out.reshape(T, -1) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def write_hf_dir(path, weights, shards=1):
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(HF_CONFIG))
    names = sorted(weights)
    if shards == 1:
        save_file(weights, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for s in range(shards):
        part = {n: weights[n] for n in names[s::shards]}
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(path / file))
        weight_map |= {n: file for n in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def permute_like_llama_cpp(w, n_heads):
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, weights, quant_types):
    import gguf

    c = HF_CONFIG
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c["num_key_value_heads"])
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_rope_dimension_count(c["head_dim"])
    writer.add_vocab_size(c["vocab_size"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                   "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                   "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                   "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                   "mlp.down_proj.weight": "ffn_down.weight"}
    for name, array in weights.items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{i}.{layer_names[rest]}"
        else:
            gname = names[name]
        if rest_is(name, "q_proj"):
            array = permute_like_llama_cpp(array, c["num_attention_heads"])
        elif rest_is(name, "k_proj"):
            array = permute_like_llama_cpp(array, c["num_key_value_heads"])
        qtype = quant_types.get(gname, gguf.GGMLQuantizationType.F32) if array.ndim == 2 else \
            gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gname, array.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gname, array.astype(np.float16))
        else:
            writer.add_tensor(gname, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def rest_is(name, proj):
    return name.endswith(f"self_attn.{proj}.weight")


def jax_logits(checkpoint, ids):
    model = build_model(checkpoint.weights, checkpoint.config)
    sparse = SparseConfig()
    tokens = jnp.zeros((1, 64), jnp.int32).at[0, : len(ids)].set(jnp.asarray(ids))
    cache = KVCache.create(checkpoint.config, sparse, 1, 64, jnp.float32)
    logits, _ = model(tokens, cache, mode="dense", sparse=sparse, lengths=jnp.asarray([len(ids)]), all_logits=True)
    return np.asarray(logits[0, : len(ids)])


IDS = [5, 17, 3, 96, 40, 40, 1, 0, 63, 22, 9]


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_safetensors_logits_match_numpy(tmp_path, shards):
    w = hf_weights()
    ckpt = load_checkpoint(write_hf_dir(tmp_path / "hf", w, shards))
    assert ckpt.config.num_kv_heads == 2 and not ckpt.config.tie_word_embeddings
    np.testing.assert_allclose(jax_logits(ckpt, IDS), numpy_forward_hf(w, IDS), rtol=1e-4, atol=1e-4)


def test_gguf_f32_with_permuted_qk_matches_hf_semantics(tmp_path):
    w = hf_weights(1)
    ckpt = load_checkpoint(write_gguf(tmp_path / "m.gguf", w, {}))
    np.testing.assert_allclose(jax_logits(ckpt, IDS), numpy_forward_hf(w, IDS), rtol=1e-4, atol=1e-4)


def test_gguf_quantized_tensors_dequantize_close_to_originals(tmp_path):
    import gguf

    w = hf_weights(2)
    quant = {"blk.0.attn_q.weight": gguf.GGMLQuantizationType.Q8_0,
             "blk.0.ffn_up.weight": gguf.GGMLQuantizationType.F16,
             "blk.1.attn_k.weight": gguf.GGMLQuantizationType.Q8_0, "token_embd.weight": gguf.GGMLQuantizationType.Q8_0}
    ckpt = load_checkpoint(write_gguf(tmp_path / "q.gguf", w, quant))
    for ours, theirs, tol in (("layers.0.q", "model.layers.0.self_attn.q_proj.weight", 0.01),
                              ("layers.0.up", "model.layers.0.mlp.up_proj.weight", 1e-3),
                              ("layers.1.k", "model.layers.1.self_attn.k_proj.weight", 0.01),
                              ("embed", "model.embed_tokens.weight", 0.03)):
        np.testing.assert_allclose(ckpt.weights[ours], w[theirs], atol=tol)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(SpardaError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.gguf")


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(SpardaError, match="cannot read GGUF"):
        load_checkpoint(bad)


def test_wrong_tensor_shape_is_a_clear_error(tmp_path):
    w = hf_weights()
    w["model.layers.1.mlp.up_proj.weight"] = w["model.layers.1.mlp.up_proj.weight"][:, :-1]
    with pytest.raises(SpardaError, match="layers.1.up has shape"):
        load_checkpoint(write_hf_dir(tmp_path / "hf", w))


def test_missing_tensor_is_a_clear_error(tmp_path):
    w = hf_weights()
    del w["model.layers.0.self_attn.v_proj.weight"]
    with pytest.raises(SpardaError, match="missing tensor layers.0.v"):
        load_checkpoint(write_hf_dir(tmp_path / "hf", w))


def test_default_model_is_found_through_the_installed_package(smollm2_checkpoint):
    assert smollm2_checkpoint.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    c = smollm2_checkpoint.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.max_context) == \
        (30, 576, 9, 3, 64, 8192)
    assert c.tie_word_embeddings

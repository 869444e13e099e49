"""Tokenizers built from GGUF metadata and from an HF tokenizer.json; the chat template."""

import json

import pytest

from sparda_jax.errors import SpardaError
from sparda_jax.tokenizer import TextTokenizer


@pytest.mark.parametrize("text", ["Hello, world!", "  leading spaces\tand\ttabs\n\nnewlines",
                                  "naïve café — 東京 🚀", "x = [1, 22, 333]  # digits", ""])
def test_round_trip(smollm2_tokenizer, text):
    assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(text)) == text


def test_ids_spell_the_text_in_the_gguf_vocabulary(smollm2_tokenizer, smollm2_checkpoint):
    vocab = smollm2_checkpoint.gguf_metadata["tokenizer.ggml.tokens"]
    ids = smollm2_tokenizer.encode("The capital of France is")
    # GPT-2 byte-level BPE writes a leading space as 'Ġ'.
    assert [vocab[i] for i in ids] == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]


def test_digits_are_split_one_by_one(smollm2_tokenizer, smollm2_checkpoint):
    vocab = smollm2_checkpoint.gguf_metadata["tokenizer.ggml.tokens"]
    assert [vocab[i] for i in smollm2_tokenizer.encode("2026")] == ["2", "0", "2", "6"]


def test_control_tokens_are_single_special_tokens(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 5
    assert smollm2_tokenizer.decode(ids) == "user\nhi"  # specials are dropped when decoding
    assert 2 in smollm2_tokenizer.eos_ids


def test_chat_template_renders_chatml(smollm2_tokenizer):
    text = smollm2_tokenizer.apply_chat_template("Why is the sky blue?")
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n")


def test_hf_tokenizer_json_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True}))
    t = TextTokenizer.from_hf_dir(tmp_path)
    assert t.encode("hello world") == [1, 3, 4]
    assert t.eos_ids == (2,)
    with pytest.raises(SpardaError, match="no chat template"):
        t.apply_chat_template("hi")


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(SpardaError, match="no tokenizer.json"):
        TextTokenizer.from_hf_dir(tmp_path)

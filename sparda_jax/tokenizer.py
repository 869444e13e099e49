"""Tokenizers from GGUF metadata (byte-level BPE) or an HF `tokenizer.json`, plus the chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from sparda_jax.errors import SpardaError

_GGUF_CONTROL_TOKEN = 3
# llama.cpp pre-tokenizer ids that split every digit before the GPT-2 regex.
_DIGIT_SPLITTING_PRE = ("smollm", "llama3", "llama-bpe", "qwen2", "deepseek-llm")


class TextTokenizer:
    """Encodes/decodes text; knows BOS/EOS and the model's chat template."""

    def __init__(self, tokenizer: Tokenizer, *, bos_id: int | None, eos_ids: tuple[int, ...], add_bos: bool,
                 chat_template: str | None):
        self._tok = tokenizer
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, user_message: str) -> str:
        """Renders one user turn and the assistant prefix, as the model's own template says."""
        if not self.chat_template:
            raise SpardaError("this model has no chat template; drop --chat")
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=[{"role": "user", "content": user_message}],
                                   add_generation_prompt=True, bos_token="", eos_token="")
        except jinja2.TemplateError as e:
            raise SpardaError(f"cannot render the model's chat template: {e}") from None

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "TextTokenizer":
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise SpardaError(f"unsupported GGUF tokenizer {kind!r} (only byte-level BPE, 'gpt2', is supported)")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
        tok = Tokenizer(bpe)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if meta.get("tokenizer.ggml.pre") in _DIGIT_SPLITTING_PRE:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        # Control tokens must be special AddedTokens, or `<|im_start|>` is split into ordinary BPE pieces.
        types = meta.get("tokenizer.ggml.token_type") or []
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, t in enumerate(types) if t == _GGUF_CONTROL_TOKEN])
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = {int(eos)} if eos is not None else set()
        # ChatML models end assistant turns with <|im_end|>, which is not always the declared EOS.
        eot = tok.token_to_id("<|im_end|>")
        if eot is not None and meta.get("tokenizer.chat_template") and "<|im_end|>" in meta["tokenizer.chat_template"]:
            eos_ids.add(eot)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        return cls(tok, bos_id=None if bos is None else int(bos), eos_ids=tuple(sorted(eos_ids)),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"))

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "TextTokenizer":
        import json

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise SpardaError(f"{path} has no tokenizer.json")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:
            raise SpardaError(f"cannot read {file}: {e}") from None
        cfg: dict[str, Any] = {}
        if (path / "tokenizer_config.json").exists():
            cfg = json.loads((path / "tokenizer_config.json").read_text())

        def token_id(value: Any) -> int | None:
            if isinstance(value, dict):
                value = value.get("content")
            return tok.token_to_id(value) if isinstance(value, str) else None

        eos = token_id(cfg.get("eos_token"))
        return cls(tok, bos_id=token_id(cfg.get("bos_token")), eos_ids=() if eos is None else (eos,),
                   add_bos=bool(cfg.get("add_bos_token", False)), chat_template=cfg.get("chat_template"))


def load_tokenizer(checkpoint) -> TextTokenizer:
    """The tokenizer that belongs to a loaded `weights.Checkpoint`."""
    if checkpoint.gguf_metadata:
        return TextTokenizer.from_gguf_metadata(checkpoint.gguf_metadata)
    return TextTokenizer.from_hf_dir(checkpoint.path)

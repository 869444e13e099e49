"""Text generation with the device-resident KV cache: one jitted prefill, one jitted decode step per token."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sparda_jax.config import ATTENTION_MODES, SparseConfig
from sparda_jax.errors import SpardaError
from sparda_jax.model import KVCache, Transformer
from sparda_jax.sampling import SamplingConfig, sample


@dataclasses.dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]  # new tokens only, without the stop token
    stop_reason: str  # "eos" or "length"
    compile_s: float
    prefill_s: float
    decode_s: float
    stats: list = dataclasses.field(default_factory=list)  # per-step telemetry of the offload engine

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token comes out of prefill; the rest are decode steps.
        steps = max(len(self.token_ids) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def cache_layout(prompt_len: int, max_new_tokens: int, block_size: int) -> tuple[int, int]:
    """(padded prompt length, cache length): the prompt is padded to whole blocks; the cache comes in buckets of
    256 tokens, which keeps recompiles rare across prompts of similar length."""
    padded = _round_up(prompt_len, block_size)
    return padded, _round_up(max(prompt_len + max_new_tokens, padded), 256)


def decode_loop(first_token: jax.Array, enqueue_step: Callable[[int, jax.Array], jax.Array], *,
                max_new_tokens: int, stop_ids: tuple[int, ...],
                on_token: Callable[[int], None] | None) -> tuple[list[int], str]:
    """Streams tokens until a stop token or `max_new_tokens`.

    `enqueue_step(step, token)` dispatches one decode step from a device-side token [1] and returns the next token
    without waiting for it. The loop enqueues step t+1 before it reads token t, so the host's work (reading and
    streaming a token, dispatching the next step) overlaps the GPU's step. When token t is a stop token, the one
    step already enqueued after it is discarded. Returns the new tokens (without the stop token) and the stop reason
    ("eos" or "length")."""
    new_ids: list[int] = []
    pending = first_token
    for step in range(max_new_tokens):
        ahead = enqueue_step(step + 1, pending) if step + 1 < max_new_tokens else None
        token = int(pending[0])
        if token in stop_ids:
            return new_ids, "eos"
        new_ids.append(token)
        if on_token is not None:
            on_token(token)
        pending = ahead
    return new_ids, "length"


class Generator:
    """Compiles prefill and decode once per (mode, shapes) and streams tokens.

    >>> gen = Generator(model, SparseConfig(top_k_blocks=16), mode="sparda")
    >>> result = gen.generate(prompt_ids, max_new_tokens=32, sampling=SamplingConfig(), seed=0)
    """

    def __init__(self, model: Transformer, sparse: SparseConfig, mode: str = "dense"):
        if mode not in ATTENTION_MODES:
            raise SpardaError(f"unknown attention mode {mode!r} (choose from {', '.join(ATTENTION_MODES)})")
        self.config = model.config
        self.sparse = sparse
        self.mode = mode
        self.dtype = model.dtype
        self._graphdef, self._state = nnx.split(model)
        self._compiled: dict[tuple, Callable] = {}

    def _prefill_fn(self):
        graphdef, mode, sparse = self._graphdef, self.mode, self.sparse

        def prefill(state, tokens, cache, lengths, key, temperature, top_k, top_p):
            model = nnx.merge(graphdef, state)
            logits, cache = model(tokens, cache, mode=mode, sparse=sparse, lengths=lengths)
            return sample(logits, key, temperature, top_k, top_p), cache

        return jax.jit(prefill, donate_argnums=(2,))

    def _decode_fn(self):
        graphdef, mode, sparse = self._graphdef, self.mode, self.sparse

        def decode(state, token, cache, key, temperature, top_k, top_p):
            model = nnx.merge(graphdef, state)
            logits, cache = model(token[:, None], cache, mode=mode, sparse=sparse)
            return sample(logits, key, temperature, top_k, top_p), cache

        return jax.jit(decode, donate_argnums=(2,))

    def _compile(self, batch: int, prompt_len: int, max_len: int):
        key = (batch, prompt_len, max_len)
        if key not in self._compiled:
            cache = jax.eval_shape(functools.partial(KVCache.create, self.config, self.sparse, batch, max_len,
                                                     self.dtype))
            scalars = SamplingConfig().as_arrays()
            rng = jax.random.key(0)
            tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
            lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
            prefill = self._prefill_fn().lower(self._state, tokens, cache, lengths, rng, *scalars).compile()
            token = jax.ShapeDtypeStruct((batch,), jnp.int32)
            decode = self._decode_fn().lower(self._state, token, cache, rng, *scalars).compile()
            self._compiled[key] = (prefill, decode)
        return self._compiled[key]

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len == 0:
            raise SpardaError("the prompt is empty")
        if max_new_tokens < 0:
            raise SpardaError(f"max-new-tokens must be >= 0, got {max_new_tokens}")
        total = prompt_len + max_new_tokens
        if total > self.config.max_context:
            raise SpardaError(f"prompt ({prompt_len} tokens) + max-new-tokens ({max_new_tokens}) = {total} exceeds "
                              f"the model's context of {self.config.max_context} tokens")

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int, sampling: SamplingConfig, seed: int = 0,
                 stop_ids: tuple[int, ...] = (), on_token: Callable[[int], None] | None = None) -> GenerationResult:
        self.check_fits(len(prompt_ids), max_new_tokens)
        padded, max_len = cache_layout(len(prompt_ids), max_new_tokens, self.sparse.block_size)
        t0 = time.perf_counter()
        prefill, decode = self._compile(1, padded, max_len)
        compile_s = time.perf_counter() - t0

        tokens = jnp.zeros((1, padded), jnp.int32).at[0, : len(prompt_ids)].set(jnp.asarray(prompt_ids, jnp.int32))
        cache = KVCache.create(self.config, self.sparse, 1, max_len, self.dtype)
        scalars = sampling.as_arrays()
        keys = jax.random.split(jax.random.key(seed), max(max_new_tokens, 1))
        new_ids: list[int] = []
        stop_reason = "length"
        prefill_s = decode_s = 0.0
        if max_new_tokens > 0:
            t0 = time.perf_counter()
            token, cache = prefill(self._state, tokens, cache, jnp.asarray([len(prompt_ids)], jnp.int32), keys[0],
                                   *scalars)
            token.block_until_ready()
            prefill_s = time.perf_counter() - t0

            def enqueue_step(step: int, token: jax.Array) -> jax.Array:
                nonlocal cache
                token, cache = decode(self._state, token, cache, keys[step], *scalars)
                return token

            t0 = time.perf_counter()
            new_ids, stop_reason = decode_loop(token, enqueue_step, max_new_tokens=max_new_tokens,
                                               stop_ids=stop_ids, on_token=on_token)
            decode_s = time.perf_counter() - t0
        return GenerationResult(list(prompt_ids), new_ids, stop_reason, compile_s, prefill_s, decode_s)

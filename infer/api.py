"""Token generation on top of an engine (the offload path of `python -m sparda_jax.generate --offload`)."""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

from infer.engine import make_engine
from sparda_jax.config import SparseConfig
from sparda_jax.errors import SpardaError
from sparda_jax.generation import GenerationResult, cache_layout, decode_loop
from sparda_jax.model import Transformer
from sparda_jax.sampling import SamplingConfig, sample


_sample = jax.jit(sample)


def program_loop(run_program: Callable[[int, int, int], np.ndarray], first_token: int, *, max_new_tokens: int,
                 block_size: int, stop_ids: tuple[int, ...],
                 on_token: Callable[[int], None] | None) -> tuple[list[int], str]:
    """`decode_loop` over the fused engine's multi-step programs: `run_program(token, index, n)` returns tokens
    index .. index + n - 1 (n <= block_size, fed `token`), so the host enqueues once per program instead of once
    per token. Tokens stream a program at a time, and up to one program's steps run past a stop token (they stay in
    engine.stats)."""
    new_ids: list[int] = []
    pending = [first_token]
    while pending:
        token = pending.pop(0)
        if token in stop_ids:
            return new_ids, "eos"
        new_ids.append(token)
        if on_token is not None:
            on_token(token)
        left = max_new_tokens - len(new_ids)
        if not pending and left > 0:
            pending = run_program(token, len(new_ids), min(left, block_size)).tolist()
    return new_ids, "length"


def generate(model: Transformer, sparse: SparseConfig, mode: str, prompt_ids: list[int], *, max_new_tokens: int,
             sampling: SamplingConfig, seed: int = 0, stop_ids: tuple[int, ...] = (),
             on_token: Callable[[int], None] | None = None, **engine_kwargs) -> GenerationResult:
    """One sequence through `make_engine(mode)`, with the same padding, cache length and sampling keys as
    `sparda_jax.generation.Generator`, so greedy tokens match the resident modes."""
    if not prompt_ids:
        raise SpardaError("the prompt is empty")
    padded, max_len = cache_layout(len(prompt_ids), max_new_tokens, sparse.block_size)
    tokens = np.zeros((1, padded), np.int32)
    tokens[0, :len(prompt_ids)] = prompt_ids
    keys = jax.random.split(jax.random.key(seed), max(max_new_tokens, 1))
    scalars = sampling.as_arrays()
    new_ids: list[int] = []
    stop_reason = "length"
    prefill_s = decode_s = 0.0
    with make_engine(model, sparse, mode, batch=1, max_len=max_len, **engine_kwargs) as engine:
        if max_new_tokens > 0:
            t0 = time.perf_counter()
            logits = engine.prefill(tokens, np.asarray([len(prompt_ids)]))
            first = _sample(logits, keys[0], *scalars)
            first.block_until_ready()
            prefill_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            if hasattr(engine, "decode_sampled"):  # the fused engine: token i still samples with keys[i]
                key_rows = np.asarray(jax.random.key_data(keys))  # sliced on the host: no compile per length

                def run_program(token: int, index: int, n: int) -> np.ndarray:
                    fed = np.asarray([token], np.int32)
                    if sampling.temperature == 0:
                        return engine.decode_greedy(fed, n)[:, 0]
                    return engine.decode_sampled(fed, jax.random.wrap_key_data(key_rows[index:index + n]),
                                                 sampling)[:, 0]

                new_ids, stop_reason = program_loop(run_program, int(first[0]), max_new_tokens=max_new_tokens,
                                                    block_size=sparse.block_size, stop_ids=stop_ids,
                                                    on_token=on_token)
            else:
                def enqueue_step(step: int, token: jax.Array) -> jax.Array:
                    return _sample(engine.decode(token, block=False), keys[step], *scalars)

                new_ids, stop_reason = decode_loop(first, enqueue_step, max_new_tokens=max_new_tokens,
                                                   stop_ids=stop_ids, on_token=on_token)
            decode_s = time.perf_counter() - t0
        stats = list(engine.stats)
    # Compiles happen inside the first steps, so they are not timed apart.
    return GenerationResult(list(prompt_ids), new_ids, stop_reason, 0.0, prefill_s, decode_s, stats)

"""Token generation on top of an engine (the offload path of `python -m sparda_jax.generate --offload`)."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np

from infer.engine import make_engine
from sparda_jax.config import SparseConfig
from sparda_jax.errors import SpardaError
from sparda_jax.model import Transformer
from sparda_jax.sampling import SamplingConfig, sample


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass
class EngineResult:
    token_ids: list[int]
    stop_reason: str
    prefill_s: float
    decode_s: float
    stats: list  # StepStats
    compile_s: float = 0.0  # compiles happen inside the first steps
    prompt_token_ids: list[int] = dataclasses.field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(len(self.token_ids) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


_sample = jax.jit(sample)


def generate(model: Transformer, sparse: SparseConfig, mode: str, prompt_ids: list[int], *, max_new_tokens: int,
             sampling: SamplingConfig, seed: int = 0, stop_ids: tuple[int, ...] = (),
             on_token: Callable[[int], None] | None = None, **engine_kwargs) -> EngineResult:
    """One sequence through `make_engine(mode)`, with the same padding, cache length and sampling keys as
    `sparda_jax.generation.Generator`, so greedy tokens match the resident modes."""
    if not prompt_ids:
        raise SpardaError("the prompt is empty")
    bs = sparse.block_size
    padded = _round_up(len(prompt_ids), bs)
    max_len = _round_up(max(len(prompt_ids) + max_new_tokens, padded), 256)
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
            token = _sample(logits, keys[0], *scalars)
            token_id = int(token[0])
            prefill_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for step in range(max_new_tokens):
                if token_id in stop_ids:
                    stop_reason = "eos"
                    break
                new_ids.append(token_id)
                if on_token is not None:
                    on_token(token_id)
                if step + 1 == max_new_tokens:
                    break
                logits = engine.decode(np.asarray([token_id]))
                token_id = int(_sample(logits, keys[step + 1], *scalars)[0])
            decode_s = time.perf_counter() - t0
        stats = list(engine.stats)
    return EngineResult(new_ids, stop_reason, prefill_s, decode_s, stats, prompt_token_ids=list(prompt_ids))

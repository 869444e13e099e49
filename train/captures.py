"""Captures of the frozen backbone at sampled query positions, computed once and reused for many Forecast epochs.

The backbone never changes during Forecast distillation, so what the loss reads from it (per layer: the Forecast's
input h_l and the queries q_l at the query positions, and the compressed keys of the whole sequence) is the same
every time a sequence comes round. `CaptureStore.build` runs the dense forward once per training sequence and keeps
those arrays at `positions_per_row` sampled positions (float16, one `row<i>.npz` per sequence, written
atomically); training steps then cost only the Forecast projections and the selector scores at those positions
(`train.loss.sampled_distillation_loss`). On 2 CPU cores a SmolLM2 step over 4 cached 4K sequences takes well
under a second, against about 16 s per sequence for the forward alone.

Positions are drawn uniformly (without replacement, seeded by the row's tokens) from [start, seq_len), start
defaulting to where top-k becomes a real choice (`train.loss.default_min_position`). A row's file is named by a hash
of its tokens, so one store serves any subset of the rows it was built from, and grows when more rows are asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sparda_jax.errors import SpardaError


@dataclasses.dataclass(frozen=True)
class SampledCaptures:
    """A batch of cached captures (a pytree of arrays; L layers, P sampled positions)."""

    attn_input: Any  # [B, L, P, hidden]
    q: Any  # [B, L, KV, G, P, D]
    kc: Any  # [B, L, KV, C, D]
    positions: Any  # [B, P] int32
    num_blocks: int  # key blocks of the captured sequences (static)


def _register():
    import jax

    jax.tree_util.register_dataclass(SampledCaptures, data_fields=["attn_input", "q", "kc", "positions"],
                                     meta_fields=["num_blocks"])


_register()


def row_key(tokens: np.ndarray) -> str:
    """A name for one row of token ids, from its contents."""
    return hashlib.sha256(np.ascontiguousarray(tokens, np.int64).tobytes()).hexdigest()[:20]


def sample_positions(seq_len: int, count: int, start: int, seed: int, key: str) -> np.ndarray:
    if not 0 < count <= seq_len - start:
        raise SpardaError(f"cannot sample {count} positions from [{start}, {seq_len})")
    rng = np.random.default_rng([seed, int(key[:12], 16)])
    return np.sort(rng.choice(np.arange(start, seq_len), count, replace=False)).astype(np.int32)


def _capture_fn(model, sparse):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sparda_jax import selection
    from sparda_jax.model import KVCache

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, positions):
        m = nnx.merge(graphdef, state)
        cache = KVCache.create(m.config, sparse, tokens.shape[0], tokens.shape[1], m.dtype)
        _, _, caps = m(tokens, cache, mode="dense", sparse=sparse, capture=True)
        take = jax.vmap(lambda x, p: x[p])  # per sequence: [T, ...] at its positions
        h = jnp.stack([take(c.attn_input, positions) for c in caps], axis=1)
        q = jnp.stack([jax.vmap(lambda x, p: x[:, :, p])(c.q, positions) for c in caps], axis=1)
        kc = jnp.stack([selection.compress_keys(c.k, sparse) for c in caps], axis=1)
        return tuple(x.astype(jnp.float16) for x in (h, q, kc))

    return lambda tokens, positions: run(state, tokens, positions)


class CaptureStore:
    """A directory of cached captures, one file per token row. meta.json records the settings that made them (model,
    sequence length, positions, dtype...); a store is reused only for the same settings."""

    def __init__(self, directory: str | Path, settings: dict[str, Any]):
        self.dir = Path(directory)
        self.settings = settings
        meta = self.dir / "meta.json"
        if meta.exists():
            saved = json.loads(meta.read_text())
            if saved != settings:
                changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
                raise SpardaError(f"capture cache {self.dir} was made with other settings ({', '.join(changed)}); "
                                  "use another --capture-dir or delete it")

    @staticmethod
    def default_dir(root: str | Path, settings: dict[str, Any]) -> Path:
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        return Path(root) / key

    def path(self, key: str) -> Path:
        return self.dir / f"row-{key}.npz"

    def build(self, model, sparse, rows: np.ndarray, *, batch: int = 1, progress: bool = True) -> list[str]:
        """Captures every row not cached yet (an interrupted build resumes where it stopped); returns the rows'
        keys, for `load`."""
        from tqdm import tqdm

        s = self.settings
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "meta.json").write_text(json.dumps(self.settings, indent=1, sort_keys=True))
        keys = [row_key(r) for r in rows]
        todo = [i for i, key in enumerate(keys) if not self.path(key).exists()]
        if not todo:
            return keys
        capture = _capture_fn(model, sparse)
        bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="capturing the backbone", unit="seq",
                   disable=not progress, file=sys.stderr, dynamic_ncols=True)
        for at in range(0, len(todo), batch):
            chunk = todo[at:at + batch]
            positions = np.stack([sample_positions(rows.shape[1], s["positions_per_row"], s["start"], s["seed"],
                                                   keys[i]) for i in chunk])
            h, q, kc = (np.asarray(x) for x in capture(rows[chunk].astype(np.int32), positions))
            for j, i in enumerate(chunk):
                tmp = self.dir / f".tmp-{os.getpid()}-{keys[i]}.npz"
                np.savez(tmp, attn_input=h[j], q=q[j], kc=kc[j], positions=positions[j])
                tmp.replace(self.path(keys[i]))  # atomic: a row file is complete or absent
            bar.update(len(chunk))
        bar.close()
        return keys

    def load(self, keys) -> SampledCaptures:
        """The rows of `keys` as float32 arrays (positions int32)."""
        parts = []
        for key in keys:
            try:
                with np.load(self.path(key)) as f:
                    parts.append({k: f[k] for k in ("attn_input", "q", "kc", "positions")})
            except (OSError, ValueError, KeyError) as e:
                raise SpardaError(f"capture cache row {self.path(key)} is unreadable ({e}); delete it to "
                                  "recompute") from None
        stacked = {k: np.stack([p[k] for p in parts]) for k in parts[0]}
        return SampledCaptures(*(stacked[k].astype(np.float32) for k in ("attn_input", "q", "kc")),
                               stacked["positions"].astype(np.int32),
                               self.settings["seq_len"] // self.settings["block_size"])

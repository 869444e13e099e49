"""Selection locality of the real default model (SmolLM2), measured on CPU, and its replay at other shapes.

`python -m infer.locality --out bench_results/engine/locality_smollm2.json` decodes with the offload engine in the
`sparse-offload` and `sparda-offload` modes (sparda with the trained Forecast: the shipped one unless `--forecast DIR`),
records every layer's selection at every step, and stores per layer:
  drift: fraction of the non-forced selected blocks that were not selected at the previous step,
  recur: of the blocks that enter the selection, the fraction selected at some earlier decode step,
and, replaying the recorded selections through `SlotMap`, the hit rate with a pool of k slots and with larger caches.

`ReplaySelector` drives a benchmark's selection with those statistics (random weights select meaninglessly): per
(layer, sequence, KV head) the non-forced blocks change at rate `drift`; an entering block is, with probability
`recur`, one this row dropped recently, else uniform over the visible blocks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from infer.slots import SlotMap
from sparda_jax.cli import ArgumentParser, run_main
from sparda_jax.errors import SpardaError


def _forced_mask(ids: np.ndarray, positions: np.ndarray, local: int, block: int) -> np.ndarray:
    cur = (positions // block)[:, None, None]
    return (ids == 0) | (ids >= cur - local)


def locality_from_trace(trace: list[list[np.ndarray]], positions: list[np.ndarray], k: int, local: int,
                        block: int, cache_factors=(1, 2, 4)) -> dict:
    """trace[step][layer] = ids [B, KV, k]; returns per-layer drift / recur and hit rates per cache size."""
    steps, layers = len(trace), len(trace[0])
    out = {"layers": []}
    for layer in range(layers):
        drift_num = drift_den = rec_num = rec_den = 0
        b, kvh, _ = trace[0][layer].shape
        seen = [[set() for _ in range(kvh)] for _ in range(b)]
        prev = None
        for s in range(steps):
            ids = trace[s][layer]
            forced = _forced_mask(ids, positions[s], local, block)
            cur = [[set(int(x) for x, f in zip(ids[i, g], forced[i, g]) if x >= 0 and not f) for g in range(kvh)]
                   for i in range(b)]
            if prev is not None:
                for i in range(b):
                    for g in range(kvh):
                        new = cur[i][g] - prev[i][g]
                        drift_num += len(new)
                        drift_den += len(cur[i][g])
                        rec_num += len(new & seen[i][g])
                        rec_den += len(new)
            for i in range(b):
                for g in range(kvh):
                    seen[i][g] |= cur[i][g]
            prev = cur
        entry = {"layer": layer, "drift": drift_num / max(drift_den, 1), "recur": rec_num / max(rec_den, 1)}
        for factor in cache_factors:
            m = SlotMap(b, kvh, int(max(p.max() for p in positions)) // block + 2, factor * k, block)
            hits = misses = 0
            for s in range(steps):
                p = m.plan(trace[s][layer], positions[s])
                if s > 0:  # the first step fills an empty pool
                    hits, misses = hits + p.hits, misses + p.misses
            entry[f"hit_rate_cache_{factor}k"] = hits / max(hits + misses, 1)
        out["layers"].append(entry)
    for key in [k_ for k_ in out["layers"][0] if k_ != "layer"]:
        out[f"mean_{key}"] = float(np.mean([e[key] for e in out["layers"]]))
    return out


def measure(text_path: str, prompt_tokens: int, steps: int, top_k: int, local: int,
            forecast_dir: str | Path | None = None) -> dict:
    from infer.engine import OffloadEngine
    from sparda_jax.config import SparseConfig
    from sparda_jax.forecast_checkpoint import default_forecast_for, load_forecast
    from sparda_jax.model import build_model
    from sparda_jax.tokenizer import load_tokenizer
    from sparda_jax.weights import load_checkpoint

    ck = load_checkpoint()
    tok = load_tokenizer(ck)
    model = build_model(ck.weights, ck.config)
    forecast_dir = forecast_dir or default_forecast_for(ck.path)
    if forecast_dir is None:
        raise SpardaError("no trained Forecast for this model: pass --forecast DIR")
    load_forecast(model, forecast_dir)
    ids = tok.encode(Path(text_path).read_text())
    while len(ids) < prompt_tokens + steps:
        ids = ids + ids
    prompt = np.asarray(ids[:prompt_tokens], np.int32)[None]
    sparse = SparseConfig(top_k_blocks=top_k, local_blocks=local)
    result = {"model": str(ck.path), "forecast": str(forecast_dir), "text": text_path, "prompt_tokens": prompt_tokens,
              "steps": steps, "top_k_blocks": top_k, "local_blocks": local, "modes": {}}
    for mode in ("sparse-offload", "sparda-offload"):
        trace, positions = [], []
        max_len = -(-(prompt_tokens + steps) // 256) * 256

        def record(layer, sel, pos, _trace=trace):
            if layer == 0:
                _trace.append([])
            _trace[-1].append(sel.copy())
            return sel

        t0 = time.time()
        with OffloadEngine(model, sparse, mode=mode, batch=1, max_len=max_len, selection_override=record) as eng:
            eng.prefill(prompt)
            for s in range(steps):
                positions.append(eng.lengths.copy())
                # Teacher forcing on the text: the next real token, so the selection follows natural text.
                eng.decode(np.asarray([ids[prompt_tokens + s]]))
        # sparda records layer l+1 before layer l+1's own turn; order by layer index per step
        result["modes"][mode] = {**locality_from_trace(trace, positions, top_k, local, sparse.block_size),
                                 "seconds": time.time() - t0}
        print(mode, {k: v for k, v in result["modes"][mode].items() if k.startswith("mean")}, flush=True)
    return result


HISTORY_FACTOR = 4  # recently dropped blocks a replay row remembers, as a multiple of its non-forced slots


def replay_update(xp, sel, history, u, u_history, drift, recur, hi):
    """One step of the locality replay for one layer, in numpy (xp=np) or jax.numpy (xp=jnp).

    sel [B, KV, nf]: the non-forced selection; history [B, KV, H] (H >= 2 nf): the row's most recently dropped
    blocks, newest first, -1 = empty; u [4, B, KV, nf] and u_history [B, KV, H]: uniform draws; hi [B, 1, 1]:
    non-forced candidates are [1, hi). Each slot changes with probability `drift`; the entering block is, with
    probability `recur`, a recently dropped block of its row (two distinct history entries are tried, since one may
    be back in the selection already), else uniform. A fresh pick that is already selected is drawn once more.
    Picks that would change nothing are not made, so the measured drift matches the given one (with picks left in
    place it fell to 0.30 for 0.6 given); a row never holds a block twice. Remembering only each slot's last drop,
    the replay reached a recurrence of 0.66 for 0.9 given, which understated a block cache larger than k; the
    history of H drops keeps it close (tests/test_infer_locality.py).
    Returns the new (sel, history).
    """
    nf, h = sel.shape[-1], history.shape[-1]

    def in_selection(x):
        return (x[..., :, None] == sel[..., None, :]).any(-1)

    # A random order of the filled history entries (empty ones last): slot s tries entries s and nf + s, so no two
    # slots of a row try the same entry.
    order = xp.argsort(xp.where(history >= 0, u_history, 2.0), axis=-1)
    first = xp.take_along_axis(history, order[..., :nf], axis=-1)
    second = xp.take_along_axis(history, order[..., nf:2 * nf], axis=-1)
    ok_first = (first >= 0) & ~in_selection(first)
    ok_second = (second >= 0) & ~in_selection(second)
    recurring = xp.where(ok_first, first, second)
    fresh = 1 + (u[2] * (hi - 1)).astype(sel.dtype)
    fresh = xp.where(in_selection(fresh), 1 + (u[3] * (hi - 1)).astype(sel.dtype), fresh)
    use_history = (u[1] < recur) & (ok_first | ok_second)
    new = xp.where(use_history, recurring, fresh)
    change = (u[0] < drift) & (use_history | ~in_selection(fresh))
    # Entering blocks are never in the selection, so a repeat can only be another slot's entering block: that
    # slot keeps its block.
    cand = xp.where(change, new, sel)
    earlier = xp.tril(xp.ones((nf, nf), dtype=bool), -1)
    change = change & ~((cand[..., :, None] == cand[..., None, :]) & earlier).any(-1)
    new_sel = xp.where(change, new, sel)
    # Blocks that entered again leave the history (so a block is in it at most once), the blocks dropped now go to
    # its front (in slot order), the older ones move back.
    history = xp.where((history[..., :, None] == new_sel[..., None, :]).any(-1), -1, history)
    rank = xp.cumsum(change, axis=-1) - 1
    one_hot = change[..., :, None] & (rank[..., :, None] == xp.arange(nf))  # [B, KV, slot, rank]
    dropped_now = (one_hot * sel[..., :, None]).sum(-2)  # [B, KV, nf]: by rank
    count = change.sum(-1, keepdims=True)
    j = xp.arange(h)
    from_now = xp.take_along_axis(dropped_now, xp.broadcast_to(xp.minimum(j, nf - 1), history.shape), axis=-1)
    from_old = xp.take_along_axis(history, xp.clip(j - count, 0, h - 1), axis=-1)
    history = xp.where(j < count, from_now, from_old).astype(history.dtype)
    return new_sel, history


class ReplaySelector:
    """A `selection_override` for benchmarks with random weights; see the module docstring."""

    def __init__(self, stats: dict, num_layers: int, batch: int, kv_heads: int, top_k: int, local: int,
                 block: int = 64, seed: int = 0):
        layers = stats["layers"]
        # Map the measured model's layers onto this model's layers by relative depth.
        pick = [layers[min(len(layers) - 1, int(i * len(layers) / num_layers))] for i in range(num_layers)]
        self.drift = np.array([p["drift"] for p in pick])
        self.recur = np.array([p["recur"] for p in pick])
        self.k, self.local, self.block = top_k, local, block
        self.rng = np.random.default_rng(seed)
        self.state: dict[int, np.ndarray] = {}
        self.history: dict[int, np.ndarray] = {}
        self.shape = (batch, kv_heads)

    def __call__(self, layer: int, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        b, kvh = self.shape
        cur = positions // self.block  # [B]
        forced = [np.concatenate([[0], np.arange(max(1, c - self.local), c + 1)]) for c in cur]
        nf = self.k - max(len(f) for f in forced)
        hi = np.maximum(cur - self.local, 2)[:, None, None]  # non-forced candidates: [1, hi)
        rng = self.rng
        if layer not in self.state:
            self.state[layer] = np.stack([np.stack([rng.choice(np.arange(1, h), nf, replace=False)
                                                    for _ in range(kvh)]) for h in hi[:, 0, 0]])
            self.history[layer] = np.full((b, kvh, HISTORY_FACTOR * nf), -1, self.state[layer].dtype)
        self.state[layer], self.history[layer] = replay_update(
            np, self.state[layer], self.history[layer], rng.random((4, b, kvh, nf)),
            rng.random(self.history[layer].shape), self.drift[layer], self.recur[layer], hi)
        sel = self.state[layer]
        out = np.full((b, kvh, self.k), -1, np.int32)
        for i in range(b):
            f = forced[i]
            out[i, :, :len(f)] = f
            out[i, :, len(f):len(f) + nf] = sel[i]
        return out


def run() -> int:
    p = ArgumentParser(prog="python -m infer.locality", description=__doc__.splitlines()[0])
    p.add_argument("--text", required=True, help="a long plain-text file (the recorded run used Debian's GPL-3 text)")
    p.add_argument("--prompt-tokens", type=int, default=3072)
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--top-k-blocks", type=int, default=16)
    p.add_argument("--local-blocks", type=int, default=4)
    p.add_argument("--forecast", help="Forecast checkpoint for sparda (default: the one shipped for the model)")
    p.add_argument("--out", default="bench_results/engine/locality_smollm2.json")
    a = p.parse_args()
    if not Path(a.text).is_file():
        raise SpardaError(f"text file not found: {a.text}")
    if a.forecast is not None and not Path(a.forecast).is_dir():
        raise SpardaError(f"Forecast checkpoint not found: {a.forecast}")
    res = measure(a.text, a.prompt_tokens, a.steps, a.top_k_blocks, a.local_blocks, a.forecast)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # never a half-written file where the benchmarks read it
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out)
    return 0


def main() -> None:
    run_main(run)


if __name__ == "__main__":
    main()


def device_replay(stats: dict, num_layers: int, batch: int, kv_heads: int, top_k: int, local: int,
                  length: int, block: int = 64, seed: int = 0):
    """`ReplaySelector` as a device selection hook for the fused engine (`infer.fused`): the same statistics (per
    layer drift and recur), drawn with jax.random inside the jitted step. Returns (hook, initial state).
    `length`: the context the benchmark starts from (all sequences equal, longer than the local window)."""
    import jax
    import jax.numpy as jnp

    init = ReplaySelector(stats, num_layers, batch, kv_heads, top_k, local, block, seed)
    nf = top_k - (local + 2)
    cur0 = length // block
    if cur0 <= local + 1 or nf <= 0:
        raise ValueError("device_replay needs a context longer than the local window")
    hi0 = cur0 - local
    rng = np.random.default_rng(seed)
    sel = [np.stack([np.stack([rng.choice(np.arange(1, hi0), nf, replace=False) for _ in range(kv_heads)])
                     for _ in range(batch)]).astype(np.int32) for _ in range(num_layers)]
    shape = (batch, kv_heads, nf)
    h = HISTORY_FACTOR * nf
    # All layers' random draws for a step come from ONE jax.random call at layer 0 (carried in the state): with a
    # split and four draws per layer, XLA compiled the 32-layer fused step in 66 s against 14 s without the hook
    # (H100 probe, 2026-11-23).
    draws = jnp.zeros((num_layers, *shape[:2], 4 * nf + h), jnp.float32)
    history = jnp.full((*shape[:2], h), -1, jnp.int32)
    state = (tuple(jnp.asarray(s) for s in sel), (history,) * num_layers, jax.random.key(seed), draws)
    drift = jnp.asarray(init.drift, jnp.float32)
    recur = jnp.asarray(init.recur, jnp.float32)

    def hook(layer, ids, positions, st):
        sel, hist, key, draws = list(st[0]), list(st[1]), st[2], st[3]
        if layer == 0:  # the first selection of every step, in both offload modes
            key, sub = jax.random.split(key)
            draws = jax.random.uniform(sub, draws.shape)
        cur = positions // block
        hi = jnp.maximum(cur - local, 2)[:, None, None]
        u = jnp.moveaxis(draws[layer, ..., :4 * nf].reshape(*shape[:2], 4, nf), 2, 0)
        sel[layer], hist[layer] = replay_update(jnp, sel[layer], hist[layer], u, draws[layer, ..., 4 * nf:],
                                                drift[layer], recur[layer], hi)
        forced = jnp.concatenate([jnp.zeros_like(cur)[:, None], cur[:, None] - local + jnp.arange(local + 1)], axis=1)
        out = jnp.concatenate([jnp.broadcast_to(forced[:, None], (*shape[:2], local + 2)), sel[layer]], axis=-1)
        # The model's real selection stays live (a dependency XLA cannot remove), so the step pays for it.
        out = jnp.where(ids == -12345, ids, out.astype(jnp.int32))
        return out, (tuple(sel), tuple(hist), key, draws)

    return hook, state


class ReplayTrace:
    """The selections `ReplaySelector` (the host-gather path's replay) makes over decode steps from context `length`
    (all sequences equal), drawn on the host before any timing and kept: `take(n)` returns the first n steps
    [n, L, B, KV, k] int32, drawing only those not drawn yet. The draws are sequential, so a shorter trace is the
    prefix of a longer one, and benchmark runs of one (mode, batch, context) share one trace (H200, Llama-3.1-8B
    shape, 32K B=8: 17-29 s of device-idle host time per run when each drew its own).

    `burn_in` unrecorded steps first fill the replay's history of dropped blocks, as a long decode would have it;
    without them the recorded steps' recurrence would start at zero."""

    def __init__(self, stats: dict, num_layers: int, batch: int, kv_heads: int, top_k: int, local: int,
                 length: int, block: int = 64, seed: int = 0, burn_in: int = 32):
        self._replay = ReplaySelector(stats, num_layers, batch, kv_heads, top_k, local, block, seed)
        self._num_layers, self._positions = num_layers, np.full(batch, length)
        self._steps: list[np.ndarray] = []
        for _ in range(burn_in):
            self._draw(0)

    def _draw(self, offset: int) -> np.ndarray:
        return np.stack([self._replay(layer, None, self._positions + offset) for layer in range(self._num_layers)])

    def take(self, steps: int) -> np.ndarray:
        while len(self._steps) < steps:
            self._steps.append(self._draw(len(self._steps)))
        return np.stack(self._steps[:steps])


def replay_trace(stats: dict, num_layers: int, batch: int, kv_heads: int, top_k: int, local: int, length: int,
                 steps: int, block: int = 64, seed: int = 0, burn_in: int = 32):
    """`ReplayTrace(...).take(steps)` on the device, for `trace_hook`: the same statistics as `device_replay`, drawn
    in numpy, nothing to compile. (Until 2026-12-02 the trace came from a jitted all-layer `device_replay` step,
    compiled anew for every benchmark run; an earlier form of that replay added 52 s to the fused step's GPU
    compile, H100, 2026-11-23.)"""
    import jax.numpy as jnp

    trace = ReplayTrace(stats, num_layers, batch, kv_heads, top_k, local, length, block, seed, burn_in)
    return jnp.asarray(trace.take(steps))


def trace_hook(trace):
    """A device selection hook that plays `trace` [S, L, B, KV, k]: the n-th decode step selects trace[n % S].

    Inside the timed step this costs one dynamic slice per step, where `device_replay` draws random numbers and
    updates every layer's selection (sorts, membership tests, scatters): work that only the offload modes would be
    charged for. Wrapping around after S steps jumps to an unrelated selection, so it can only overstate misses.
    Returns (hook, state).
    """
    import jax
    import jax.numpy as jnp

    num_steps, num_layers = trace.shape[:2]

    def hook(layer, ids, positions, st):
        full, step, current = st
        if layer == 0:  # the first selection of every step, in both offload modes
            current = jax.lax.dynamic_index_in_dim(full, step % num_steps, 0, keepdims=False)
            step = step + 1
        # The model's real selection stays live (a dependency XLA cannot remove), so the step pays for it.
        out = jnp.where(ids == -12345, ids, current[layer])
        return out, (full, step, current)

    return hook, (trace, jnp.int32(0), jnp.zeros(trace.shape[1:], jnp.int32))


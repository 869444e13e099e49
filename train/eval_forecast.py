"""`python -m train.eval_forecast`: recall@k of a Forecast against the query selector, and perplexity by mode.

Recall@k (per layer l): of the blocks the query selector of layer l picks for a token (its top-k, forced sink/local
blocks excluded), the fraction that the Forecast of layer l-1 (layer 0: q_select) also picks among its own non-forced
top-k. Counted at every query position >= --min-position (default top_k_blocks * 64: before that all visible blocks
fit into k and recall is 1 trivially), summed over sequences, KV heads and positions. Beside the given Forecast it
reports two training-free baselines: `query_mean` (the model's default init: layer l's group-mean query weights on
layer l-1's input) and `reuse` (layer l reuses layer l-1's own query-selector blocks; undefined for layer 0), and
with --compare DIR a second Forecast (`compare`, e.g. an earlier one), scored on the same forward.

Perplexity of the same text under dense, sparse (query selector) and sparda attention, measured two ways:
  * `prefill`: the model's own forward (`Transformer.__call__`) over each whole sequence: one selection per 64-token
    query block (the block scores of its 64 queries max-pooled), as in chunked prefill;
  * `per_token`: decode-faithful: every token attends to the blocks selected for that token alone (what one decode
    step per token would attend to), with the same selection functions, run as masked dense attention.
Dense is the same either way (a built-in check).

Writes `eval.json` and `recall_per_layer.png` to --out (default bench_results/forecast/); --json also prints the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import platform
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from sparda_jax.cli import ArgumentParser, run_main
from sparda_jax.errors import SpardaError

DEFAULT_EVAL_DATA = "austen,pg"
METHODS = ("forecast", "compare", "query_mean", "reuse")  # "compare" only with --compare


# ------------------------------------------------------------------------------------------------ recall


def recall_counts_per_layer(model, forecast_states: dict[str, Any], tokens, sparse, min_position: int):
    """Dense forward once, then per layer the hits/totals of every method. Returns {method: (hits [L], total [L])}.

    `model` is a Transformer; `forecast_states` maps a method name to an `nnx.State` of ForecastParam to score with.
    Pure function of arrays once `model` is split; jit it via `make_recall_fn`.
    """
    import jax.numpy as jnp
    from flax import nnx

    from sparda_jax.model import KVCache
    from train import loss as L

    b, t = tokens.shape
    cache = KVCache.create(model.config, sparse, b, t, model.dtype)
    _, _, captures = model(tokens, cache, mode="dense", sparse=sparse, capture=True)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    targets = [L.layer_target(c.q, c.k, positions, sparse) for c in captures]
    out = {}
    for name, state in forecast_states.items():
        nnx.update(model, state)
        outputs = L.selector_outputs(model, [c.attn_input for c in captures], positions)
        counts = [L.recall_counts(L.selector_nonforced(f, tg, positions, sparse), tg.nonforced, positions,
                                  min_position) for f, tg in zip(outputs, targets)]
        out[name] = (jnp.stack([h for h, _ in counts]), jnp.stack([n for _, n in counts]))
    reuse = [(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))] + [
        L.recall_counts(prev.nonforced, tg.nonforced, positions, min_position)
        for prev, tg in zip(targets, targets[1:])]
    out["reuse"] = (jnp.stack([h for h, _ in reuse]), jnp.stack([n for _, n in reuse]))
    return out


def make_recall_fn(model, sparse, min_position: int):
    import jax
    from flax import nnx

    from sparda_jax.model import ForecastParam

    graphdef, _, rest = nnx.split(model, ForecastParam, ...)

    @jax.jit
    def fn(states, rest, tokens):
        m = nnx.merge(graphdef, next(iter(states.values())), rest)
        return recall_counts_per_layer(m, states, tokens, sparse, min_position)

    return lambda states, tokens: fn(states, rest, tokens)


# ------------------------------------------------------------------------------------------------ perplexity


def _nll(logits, tokens):
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -picked.sum(), picked.size


def prefill_nll(model, tokens, sparse, mode: str):
    """Sum of next-token NLL over the sequence with the model's own forward in `mode` (per-query-block selection)."""
    from sparda_jax.model import KVCache

    b, t = tokens.shape
    cache = KVCache.create(model.config, sparse, b, t, model.dtype)
    logits, _ = model(tokens, cache, mode=mode, sparse=sparse, all_logits=True)
    return _nll(logits, tokens)


MODE_IDS = {"dense": 0, "sparse": 1, "sparda": 2}


def per_token_nll(model, tokens, sparse, mode, query_chunk: int = 512):
    """Sum of next-token NLL when every token attends to its own selection (decode-faithful), via masked attention.

    `mode` is a MODE_IDS value and may be traced, so one compiled function serves every mode.
    """
    import jax.numpy as jnp

    from sparda_jax import selection
    from sparda_jax.model import rope_frequencies
    from train.loss import blocks_to_mask

    c = model.config
    b, t = tokens.shape
    bs = sparse.block_size
    num_blocks = t // bs
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    inv_freq = rope_frequencies(c)
    mode = jnp.asarray(mode)
    x = model.embed[...][tokens]
    selector = None
    for i, layer in enumerate(model.layers):
        h, q, k, v = layer.attention_inputs(x, positions, inv_freq)
        kc = selection.compress_keys(k, sparse)
        if i == 0:
            selector = layer.attn.selector_query(layer.attn.q_select, h, positions, inv_freq)
        scores = jnp.where(mode == MODE_IDS["sparse"], selection.query_selector_scores(q, kc, positions, sparse),
                           selection.forecast_scores(selector, kc, positions, sparse))
        ids = selection.select_for_queries(scores, positions, num_blocks, sparse, per_query_block=False)
        allowed = blocks_to_mask(ids, num_blocks) | (mode == MODE_IDS["dense"])  # [B, KV, T, NB]
        attn = _masked_attention(q, k, v, allowed, bs, query_chunk)
        x = layer.finish(x, attn)
        selector = layer.attn.selector_query(layer.attn.forecast, h, positions, inv_freq)
    return _nll(model.logits(x), tokens)


def _masked_attention(q, k, v, allowed_blocks, block_size: int, query_chunk: int):
    """Causal attention where query t sees key s only if block s // block_size is allowed for t.

    q: [B, KV, G, T, D]; k, v: [B, KV, T, D]; allowed_blocks: [B, KV, T, NB]. Processed in query chunks.
    """
    import jax
    import jax.numpy as jnp

    b, kv, g, t, d = q.shape
    chunk = math.gcd(t, query_chunk)
    n = t // chunk
    key_pos = jnp.arange(t)
    key_block = key_pos // block_size
    qs = q.reshape(b, kv, g, n, chunk, d).transpose(3, 0, 1, 2, 4, 5)
    allowed = allowed_blocks.reshape(b, kv, n, chunk, -1).transpose(2, 0, 1, 3, 4)
    starts = jnp.arange(n) * chunk

    def one(args):
        qc, ac, start = args
        q_pos = start + jnp.arange(chunk)
        mask = ac[..., key_block] & (key_pos[None, :] <= q_pos[:, None])  # [B, KV, chunk, T]
        logits = jnp.einsum("bkgtd,bksd->bkgts", qc.astype(jnp.float32), k.astype(jnp.float32)) * d ** -0.5
        logits = jnp.where(mask[:, :, None], logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bkgts,bksd->bkgtd", probs, v.astype(jnp.float32)).astype(q.dtype)

    out = jax.lax.map(one, (qs, allowed, starts))  # [n, B, KV, G, chunk, D]
    return out.transpose(1, 2, 3, 0, 4, 5).reshape(b, kv, g, t, d)


def make_nll_fn(model, sparse, kind: str):
    """fn(forecast_state, tokens, mode) -> (nll sum, count). Compiles once per mode for `prefill` (the model's mode
    is static) and once in all for `per_token` (its mode is traced)."""
    import jax
    from flax import nnx

    from sparda_jax.model import ForecastParam

    graphdef, _, rest = nnx.split(model, ForecastParam, ...)
    if kind == "prefill":
        @functools.partial(jax.jit, static_argnums=3)
        def fn(forecast, rest, tokens, mode):
            return prefill_nll(nnx.merge(graphdef, forecast, rest), tokens, sparse, mode)

        return lambda forecast, tokens, mode: fn(forecast, rest, tokens, mode)

    @jax.jit
    def fn_traced(forecast, rest, tokens, mode_id):
        return per_token_nll(nnx.merge(graphdef, forecast, rest), tokens, sparse, mode_id)

    return lambda forecast, tokens, mode: fn_traced(forecast, rest, tokens, MODE_IDS[mode])


# ------------------------------------------------------------------------------------------------ driver


def evaluate(model, forecast_states: dict[str, Any], rows: np.ndarray, sparse, *, min_position: int,
             ppl_kinds: tuple[str, ...] = ("prefill", "per_token"), batch: int = 1, recall: bool = True,
             progress: bool = True) -> dict[str, Any]:
    """Recall per layer for every method and perplexities by (kind, mode) over `rows` [N, T]."""
    from tqdm import tqdm

    num_layers = model.config.num_layers
    methods = [m for m in METHODS if m in forecast_states or m == "reuse"]
    hits = {m: np.zeros(num_layers) for m in methods}
    totals = {m: np.zeros(num_layers) for m in methods}
    recall_fn = make_recall_fn(model, sparse, min_position)
    batches = [rows[i: i + batch] for i in range(0, len(rows), batch)]
    for tokens in tqdm(batches if recall else [], desc="recall", disable=not progress, file=sys.stderr):
        counts = recall_fn(forecast_states, np.asarray(tokens, np.int32))
        for m, (h, n) in counts.items():
            hits[m] += np.asarray(h, np.float64)
            totals[m] += np.asarray(n, np.float64)

    recalls: dict[str, Any] = {}
    for m in methods if recall else ():
        per_layer = [float(h / n) if n else None for h, n in zip(hits[m], totals[m])]
        forecast_layers = [x for x in per_layer[1:] if x is not None]
        recalls[m] = {"per_layer": per_layer,
                     "mean": float(np.mean(forecast_layers)) if forecast_layers else None,
                     "mean_with_layer0": (float(np.mean([x for x in per_layer if x is not None]))
                                          if per_layer[0] is not None else None)}

    ppl: dict[str, dict[str, float]] = {}
    mode_states = [("dense", "forecast"), ("sparse", "forecast"), ("sparda", "forecast"),
                   ("sparda_query_mean", "query_mean")] + ([("sparda_compare", "compare")]
                                                           if "compare" in forecast_states else [])
    for kind in ppl_kinds:
        ppl[kind] = {}
        fn = make_nll_fn(model, sparse, kind)
        for label, state_name in tqdm(mode_states, desc=f"ppl {kind}", disable=not progress, file=sys.stderr):
            mode = "sparda" if label.startswith("sparda") else label
            total, count = 0.0, 0
            for tokens in batches:
                nll, n = fn(forecast_states[state_name], np.asarray(tokens, np.int32), mode)
                total += float(nll)
                count += int(n)
            ppl[kind][label] = math.exp(total / count)
    return {"recall": recalls, "perplexity": ppl,
            "recall_tokens_counted": {m: float(totals[m].sum()) for m in methods if recall}}


def plot_recall(result: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = {"forecast": "trained Forecast", "compare": "compared Forecast (--compare)",
              "query_mean": "query-mean init (training-free)", "reuse": "reuse layer l-1's selection"}
    for m, style in zip(METHODS, ("o-", "d-", "s--", "^:")):
        if m not in result["recall"]:
            continue
        per_layer = result["recall"][m]["per_layer"]
        xs = [i for i, v in enumerate(per_layer) if v is not None]
        mean = result["recall"][m]["mean"]
        ax.plot(xs, [per_layer[i] for i in xs], style, ms=4, label=f"{labels[m]} (mean {mean:.3f})")
    ax.set_xlabel("layer l (selected by the Forecast of layer l-1; layer 0 by q_select)")
    ax.set_ylabel("recall@k of the query selector's blocks")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("\n".join(textwrap.wrap(title, 120)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)




def build_parser() -> argparse.ArgumentParser:
    from sparda_jax.config import SparseConfig

    p = ArgumentParser(prog="python -m train.eval_forecast", description=__doc__.splitlines()[0])
    p.add_argument("--forecast", help="Forecast directory (save_forecast / train.forecast output); default: the "
                                      "one shipped for the model")
    p.add_argument("--compare", help="also score this Forecast directory (e.g. an earlier one) on the same forward")
    p.add_argument("--model", help="GGUF file or HF directory (default: the embedded SmolLM2-135M-Instruct)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text-file", help="evaluate on this text file")
    src.add_argument("--data", help=f"evaluate on the held-out split of these sources (default {DEFAULT_EVAL_DATA})")
    src.add_argument("--tokens", help="evaluate on the token ids in this .npy")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="as in training (sets the split)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per evaluated sequence (multiple of 64)")
    p.add_argument("--num-seqs", type=int, default=4, help="sequences to evaluate (at most)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--top-k-blocks", type=int, default=SparseConfig.top_k_blocks)
    p.add_argument("--local-blocks", type=int, default=SparseConfig.local_blocks)
    p.add_argument("--min-position", type=int, help="first query position counted (default top_k_blocks * 64)")
    p.add_argument("--ppl", default="prefill,per_token", help="perplexity kinds: prefill, per_token, none")
    p.add_argument("--no-recall", action="store_true", help="perplexity only")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", default="bench_results/forecast", help="folder for eval.json and recall_per_layer.png")
    p.add_argument("--cache-dir", default="runs/data_cache", help="tokenised data cache ('' = none)")
    p.add_argument("--json", action="store_true", help="print the result JSON to stdout")
    p.add_argument("--no-progress", action="store_true")
    return p


def _validate(args):
    from sparda_jax.config import SparseConfig

    if args.seq_len <= 0 or args.seq_len % 64:
        raise SpardaError(f"--seq-len must be a positive multiple of 64, got {args.seq_len}")
    if args.num_seqs <= 0 or args.batch <= 0:
        raise SpardaError("--num-seqs and --batch must be positive")
    for name in ("forecast", "compare", "model", "text_file", "tokens"):
        value = getattr(args, name)
        if value is not None and not Path(value).exists():
            raise SpardaError(f"--{name.replace('_', '-')} not found: {value}")
    kinds = tuple(k for k in args.ppl.split(",") if k and k != "none")
    bad = [k for k in kinds if k not in ("prefill", "per_token")]
    if bad:
        raise SpardaError(f"unknown --ppl kind(s) {', '.join(bad)} (prefill, per_token, none)")
    return SparseConfig(top_k_blocks=args.top_k_blocks, local_blocks=args.local_blocks), kinds


def eval_rows(args, tokenizer) -> tuple[np.ndarray, str]:
    from train import data

    if args.text_file is not None:
        text = Path(args.text_file).read_text(encoding="utf-8", errors="replace")
        tokens = np.asarray(tokenizer.encode(text), np.int32)
        source = f"text file {Path(args.text_file).name}"
    elif args.tokens is not None:
        tokens = data.load_token_rows(args.tokens, 1).reshape(-1).astype(np.int32)
        source = f"token file {Path(args.tokens).name}"
    else:
        spec = args.data or DEFAULT_EVAL_DATA
        packed = data.prepare(spec, tokenizer, args.seq_len, heldout_fraction=args.heldout_fraction,
                              cache_dir=Path(args.cache_dir) if args.cache_dir else None)
        tokens = packed.heldout.reshape(-1).astype(np.int32)
        source = f"held-out split of {spec} ({', '.join(packed.heldout_docs[:6])}" + (
            ", ...)" if len(packed.heldout_docs) > 6 else ")")
    rows = len(tokens) // args.seq_len
    if rows == 0:
        raise SpardaError(f"the evaluation text has {len(tokens)} tokens, fewer than --seq-len {args.seq_len}")
    if int(tokens.max()) >= tokenizer.vocab_size:
        raise SpardaError(f"token id {int(tokens.max())} is outside the model's vocabulary")
    rows = tokens[: rows * args.seq_len].reshape(rows, args.seq_len)
    # Spread the evaluated rows over the whole text rather than taking its beginning.
    picked = np.unique(np.linspace(0, len(rows) - 1, min(args.num_seqs, len(rows))).round().astype(int))
    return rows[picked], source


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    sparse, kinds = _validate(args)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sparda_jax import forecast_checkpoint
    from sparda_jax.model import ForecastParam, build_model
    from sparda_jax.tokenizer import load_tokenizer
    from sparda_jax.weights import load_checkpoint
    from train.loss import default_min_position

    checkpoint = load_checkpoint(args.model)
    if args.seq_len > checkpoint.config.max_context:
        raise SpardaError(f"--seq-len {args.seq_len} exceeds the model's context of {checkpoint.config.max_context}")
    forecast_dir = args.forecast or forecast_checkpoint.default_forecast_for(checkpoint.path)
    if forecast_dir is None:
        raise SpardaError("no --forecast given and none ships for this model")
    tokenizer = load_tokenizer(checkpoint)
    rows, source = eval_rows(args, tokenizer)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = build_model(checkpoint.weights, checkpoint.config, dtype=dtype, forecast_init="query_mean")
    init_state = jax.tree.map(jnp.copy, nnx.state(model, ForecastParam))
    states = {"query_mean": init_state}
    if args.compare is not None:
        forecast_checkpoint.load_forecast(model, args.compare)
        states["compare"] = jax.tree.map(jnp.copy, nnx.state(model, ForecastParam))
    meta = forecast_checkpoint.load_forecast(model, forecast_dir)
    states["forecast"] = nnx.state(model, ForecastParam)
    min_position = default_min_position(sparse) if args.min_position is None else args.min_position

    result = evaluate(model, states, rows, sparse, min_position=min_position, ppl_kinds=kinds, batch=args.batch,
                      recall=not args.no_recall, progress=not args.no_progress)
    result["settings"] = {
        "forecast": str(forecast_dir), "forecast_metadata": meta, "compare": args.compare,
        "model": checkpoint.path.name, "text": source,
        "sequences": int(len(rows)), "seq_len": args.seq_len, "top_k_blocks": sparse.top_k_blocks,
        "local_blocks": sparse.local_blocks, "min_position": min_position, "dtype": args.dtype,
        "device": f"{jax.default_backend()}: {jax.devices()[0].device_kind}", "host": platform.node(),
        "date": datetime.date.today().isoformat(), "command": "python -m train.eval_forecast " + " ".join(
            sys.argv[1:] if argv is None else argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    title = (f"{checkpoint.path.name}: recall@{sparse.top_k_blocks} (local {sparse.local_blocks}), {len(rows)} x "
             f"{args.seq_len} tokens, {source[:80]}")
    if result["recall"]:
        plot_recall(result, out / "recall_per_layer.png", title)
    _print_summary(result)
    if args.json:
        print(json.dumps(result))
    return result


def _print_summary(result: dict[str, Any]) -> None:
    r = result["recall"]
    if r:
        print("recall@k mean over layers 1..L-1: " + ", ".join(
            f"{m} {r[m]['mean']:.4f}" for m in METHODS if m in r and r[m]["mean"] is not None), file=sys.stderr)
        print(f"layer 0 (q_select): forecast {r['forecast']['per_layer'][0]}, query_mean "
              f"{r['query_mean']['per_layer'][0]}", file=sys.stderr)
    for kind, values in result["perplexity"].items():
        print(f"perplexity ({kind}): " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()), file=sys.stderr)


def main() -> None:
    def cli() -> int:
        run()  # the result dict is for library callers; as a command the outcome is the exit code
        return 0

    run_main(cli)


if __name__ == "__main__":
    main()

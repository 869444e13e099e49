"""`python -m train.forecast`: distil the Forecast projections (and layer 0's q_select) from the query selector.

The backbone is frozen. Each step runs the dense forward once with `capture=True`; the loss over all layers is then a
function of the Forecast parameters alone (SPARDA.md §4; `train.loss`). With `--cache-positions N` the forward runs
once per training sequence instead, keeping N sampled query positions (`train.captures`), and the steps train on those
captures for as many epochs as --steps asks. AdamW (lr 5e-4, betas 0.9/0.95, eps 1e-6, weight decay 0.01), gradient
clipping at 0.5, constant learning rate. The Forecast is kept in float32 even when the backbone runs in bfloat16.

Outputs under --out: `checkpoints/<step>/` (Orbax: Forecast + optimizer state + step + data position; atomic, the last
two kept), `log.jsonl` (one line of metrics per step), `run.json` (the settings; `--resume` checks them), and
`forecast/` (written with `save_forecast`: load it with `python -m sparda_jax.generate --attention sparda --forecast`).
Bad input ends in one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sparda_jax.cli import ArgumentParser, run_main
from sparda_jax.config import SparseConfig
from sparda_jax.errors import SpardaError

DEFAULT_DATA = "austen,pg,hotpotqa"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-6
    weight_decay: float = 0.01
    clip: float = 0.5


@functools.lru_cache(maxsize=8)
def make_optimizer(cfg: OptimConfig):
    """One transformation object per config, so jitted steps that take it as a static argument share compiles."""
    import optax

    return optax.chain(optax.clip_by_global_norm(cfg.clip),
                       optax.adamw(cfg.lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))


class ForecastTrainer:
    """Holds the split model (trainable Forecast state, frozen rest), the optimizer state and the jitted step."""

    def __init__(self, model, sparse, optim: OptimConfig = OptimConfig(), micro_batches: int = 1,
                 domain: str = "nonforced", bins: str = "selected"):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from sparda_jax.model import ForecastParam
        from train.loss import LOSS_BINS, LOSS_DOMAINS

        if domain not in LOSS_DOMAINS or bins not in LOSS_BINS:
            raise SpardaError(f"unknown loss domain {domain!r} or bins {bins!r} (domains: {', '.join(LOSS_DOMAINS)}; "
                              f"bins: {', '.join(LOSS_BINS)})")
        self.config = model.config
        self.sparse = sparse
        self.dtype = model.dtype
        self.micro_batches = micro_batches
        self.domain, self.bins = domain, bins
        self.tx = make_optimizer(optim)
        self.graphdef, trainable, self.frozen = nnx.split(model, ForecastParam, ...)
        # float32 master weights for the Forecast, whatever the backbone's dtype.
        self.trainable = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), trainable)  # donated later
        self.opt_state = self.tx.init(self.trainable)
        self.step = 0

    def train_step(self, batch) -> dict[str, Any]:
        """One optimizer step on token rows [B, T] (dense forward, then the loss) or on a `SampledCaptures` batch
        (the loss alone, at the cached positions)."""
        import jax

        from train.captures import SampledCaptures

        if isinstance(batch, SampledCaptures):
            self.trainable, self.opt_state, loss, metrics = _jitted_cached_step()(
                self.trainable, self.frozen, self.opt_state, batch, graphdef=self.graphdef, tx=self.tx,
                sparse=self.sparse, domain=self.domain, bins=self.bins)
        else:
            if batch.shape[0] % self.micro_batches:
                raise SpardaError(f"a batch of {batch.shape[0]} does not split into {self.micro_batches} "
                                  "micro-batches")
            self.trainable, self.opt_state, loss, metrics = _train_step(
                self.trainable, self.frozen, self.opt_state, batch, graphdef=self.graphdef, tx=self.tx,
                sparse=self.sparse, micro_batches=self.micro_batches, domain=self.domain, bins=self.bins)
        self.step += 1
        metrics = jax.device_get(metrics)
        hits, total = metrics["recall_hits"].astype(np.float64), metrics["recall_total"].astype(np.float64)
        return {"step": self.step, "loss": float(loss), "grad_norm": float(metrics["grad_norm"]),
                "recall": float(hits.sum() / max(total.sum(), 1.0)),
                "layer_loss": [float(x) for x in metrics["loss"]],
                "layer_recall": [float(h / t) if t else None for h, t in zip(hits, total)]}

    def model(self):
        """The model with the current Forecast (kept in float32; its outputs are scored in float32 anyway)."""
        from flax import nnx

        return nnx.merge(self.graphdef, self.trainable, self.frozen)

    # ---------------------------------------------------------------------------------------- checkpoints

    def _state_tree(self, data_position: int) -> dict[str, Any]:
        import jax

        params = {jax.tree_util.keystr(path): leaf
                  for path, leaf in jax.tree_util.tree_flatten_with_path(self.trainable)[0]}
        opt = {f"{i:04d}": leaf for i, leaf in enumerate(jax.tree.leaves(self.opt_state))}
        return {"params": params, "opt": opt, "step": np.int64(self.step), "data_position": np.int64(data_position)}

    def save(self, manager, data_position: int) -> None:
        import orbax.checkpoint as ocp

        manager.save(self.step, args=ocp.args.StandardSave(self._state_tree(data_position)), force=True)
        manager.wait_until_finished()

    def restore(self, manager, step: int) -> int:
        """Loads checkpoint `step`; returns the saved data position."""
        import jax
        import orbax.checkpoint as ocp

        current = self._state_tree(0)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                                if isinstance(x, np.generic) else jax.ShapeDtypeStruct(x.shape, x.dtype), current)
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax raises many types for missing/corrupt/mismatched trees
            raise SpardaError(f"cannot restore training checkpoint {step}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(self.trainable)
        self.trainable = jax.tree.unflatten(
            treedef, [jax.numpy.asarray(restored["params"][jax.tree_util.keystr(p)]) for p, _ in leaves_with_path])
        opt_def = jax.tree.structure(self.opt_state)
        self.opt_state = jax.tree.unflatten(
            opt_def, [jax.numpy.asarray(restored["opt"][f"{i:04d}"]) for i in range(opt_def.num_leaves)])
        self.step = int(restored["step"])
        return int(restored["data_position"])


@functools.cache
def _jitted_step():
    import jax

    return jax.jit(_step, static_argnames=("graphdef", "tx", "sparse", "micro_batches", "domain", "bins"),
                   donate_argnums=(0, 2))


def _train_step(*args, **kwargs):
    return _jitted_step()(*args, **kwargs)


@functools.cache
def _jitted_cached_step():
    import jax

    return jax.jit(_cached_step, static_argnames=("graphdef", "tx", "sparse", "domain", "bins"),
                   donate_argnums=(0, 2))


def _apply_update(trainable, opt_state, tx, grads):
    import optax

    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state


def _cached_step(trainable, frozen, opt_state, batch, *, graphdef, tx, sparse, domain, bins):
    """One optimizer step on cached captures: no backbone forward (`train.captures`)."""
    import jax
    import optax
    from flax import nnx

    from train.loss import sampled_distillation_loss

    layers = batch.attn_input.shape[1]

    def loss_fn(params):
        return sampled_distillation_loss(nnx.merge(graphdef, params, frozen),
                                         [batch.attn_input[:, i] for i in range(layers)],
                                         [batch.q[:, i] for i in range(layers)],
                                         [batch.kc[:, i] for i in range(layers)], batch.positions, batch.num_blocks,
                                         sparse, domain=domain, bins=bins, remat=False)  # small: a sample of positions

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    trainable, opt_state = _apply_update(trainable, opt_state, tx, grads)
    return trainable, opt_state, loss, dict(metrics, grad_norm=optax.tree.norm(grads))


def _step(trainable, frozen, opt_state, tokens, *, graphdef, tx, sparse, micro_batches=1, domain="nonforced",
          bins="selected"):
    """One optimizer step: dense forward with captures, then the loss as a function of the Forecast alone.

    micro_batches > 1 splits the batch into that many equal parts run one after another (lax.scan), with the
    gradients and metrics averaged (hits and totals summed): the paper's global batch of 32 at 8K tokens does not fit
    one forward of SmolLM2's captures in memory.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from sparda_jax.model import KVCache
    from train.loss import distillation_loss

    model = nnx.merge(graphdef, trainable, frozen)
    b, t = tokens.shape

    def loss_and_grads(part):
        cache = KVCache.create(model.config, sparse, part.shape[0], t, model.dtype)
        _, _, captures = model(part, cache, mode="dense", sparse=sparse, capture=True)

        def loss_fn(params):
            return distillation_loss(nnx.merge(graphdef, params, frozen), captures, sparse, domain=domain, bins=bins)

        return jax.value_and_grad(loss_fn, has_aux=True)(trainable)

    parts = tokens.reshape(micro_batches, b // micro_batches, t)
    zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(loss_and_grads, parts[0]))
    ((loss, metrics), grads), _ = jax.lax.scan(
        lambda total, part: (jax.tree.map(jnp.add, total, loss_and_grads(part)), None), zero, parts)
    scale = 1.0 / micro_batches
    loss, grads = loss * scale, jax.tree.map(lambda g: g * scale, grads)
    metrics = dict(metrics, loss=metrics["loss"] * scale)  # per-layer losses are means; hits and totals are counts
    trainable, opt_state = _apply_update(trainable, opt_state, tx, grads)
    return trainable, opt_state, loss, dict(metrics, grad_norm=optax.tree.norm(grads))


def checkpoint_manager(directory: Path):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def run_training(trainer: ForecastTrainer, batches: Callable[[int], np.ndarray], *, steps: int, out: Path,
                 save_every: int, resume: bool, run_info: dict[str, Any], max_seconds: float | None = None,
                 progress: bool = True) -> list[dict[str, Any]]:
    """The loop: resume if asked, train to `steps`, checkpoint every `save_every` steps and at the end.

    `batches(i)` returns the i-th batch (a pure function of i, so resuming at data position i repeats nothing).
    Returns the log records of the steps run here.
    """
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    info_file = out / "run.json"
    manager = checkpoint_manager(out / "checkpoints")
    latest = manager.latest_step()
    data_position = 0
    if resume:
        if latest is None:
            raise SpardaError(f"--resume: no checkpoint in {out / 'checkpoints'}")
        if info_file.exists():
            saved = json.loads(info_file.read_text())
            changed = {k: (saved.get(k), v) for k, v in run_info.items() if k in RESUME_MUST_MATCH
                       and saved.get(k) != v}
            if changed:
                raise SpardaError("--resume with different settings: " + ", ".join(
                    f"{k} was {a!r}, now {b!r}" for k, (a, b) in changed.items()))
        data_position = trainer.restore(manager, latest)
    elif latest is not None:
        raise SpardaError(f"{out} already holds training checkpoints: pass --resume, or choose another --out")
    info_file.write_text(json.dumps(run_info, indent=2))

    records = []
    start = time.monotonic()
    bar = tqdm(total=steps, initial=trainer.step, disable=not progress, dynamic_ncols=True, file=sys.stderr)
    with open(out / "log.jsonl", "a") as log:
        while trainer.step < steps:
            record = trainer.train_step(batches(data_position))
            data_position += 1
            record["elapsed_s"] = round(time.monotonic() - start, 3)
            records.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", recall=f"{record['recall']:.3f}")
            if not progress and (trainer.step % 10 == 0 or trainer.step == 1):
                print(f"step {trainer.step}: loss {record['loss']:.5f}, recall {record['recall']:.4f}, "
                      f"grad norm {record['grad_norm']:.4f}, {record['elapsed_s']:.1f} s", file=sys.stderr, flush=True)
            out_of_time = max_seconds is not None and time.monotonic() - start > max_seconds
            if trainer.step % save_every == 0 or trainer.step == steps or out_of_time:
                trainer.save(manager, data_position)
            if out_of_time:
                print(f"\nstopping at step {trainer.step}: time budget of {max_seconds:.0f} s used", file=sys.stderr)
                break
    bar.close()
    manager.close()
    return records


# Settings that must not change between a run and its --resume (the step count and time budget may).
RESUME_MUST_MATCH = ("model", "data", "seq_len", "batch", "lr", "dtype", "seed", "init", "init_from", "top_k_blocks",
                     "local_blocks", "heldout_fraction", "loss_domain", "loss_bins", "cache_positions", "cache_rows")




def build_parser() -> argparse.ArgumentParser:
    from sparda_jax.config import SparseConfig

    p = ArgumentParser(prog="python -m train.forecast", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF file or HF directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="comma-separated sources: austen, pg, hotpotqa, squad, a .txt/.jsonl file, a folder of "
                        ".txt files; or one .npy of token ids (already the training split)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, help="sequences per forward (divides --batch; default: all of it): the "
                   "gradients of --batch / --micro-batch forwards are averaged, e.g. the paper's batch 32 as 8 x 4")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (a multiple of 64)")
    p.add_argument("--lr", type=float, default=OptimConfig.lr)
    p.add_argument("--out", required=True, help="run directory (checkpoints, log, final forecast/)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="backbone dtype")
    p.add_argument("--seed", type=int, default=0, help="data order")
    p.add_argument("--init", default="query_mean", choices=("query_mean", "uniform"),
                   help="Forecast init: layer l+1's group-mean queries (default) or the paper's uniform init")
    p.add_argument("--init-from", help="start from this Forecast directory (save_forecast output, e.g. a "
                   "shipped or earlier trained Forecast) instead of --init")
    p.add_argument("--top-k-blocks", type=int, default=SparseConfig.top_k_blocks)
    p.add_argument("--local-blocks", type=int, default=SparseConfig.local_blocks)
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="documents held out from training")
    p.add_argument("--cache-dir", default="runs/data_cache", help="where tokenised data is cached ('' = none)")
    p.add_argument("--loss-domain", default="nonforced", choices=("nonforced", "paper"),
                   help="keys the KL runs over: those of non-forced blocks (default) or every visible key "
                        "(SPARDA.md §4 as written); see train.loss.layer_loss")
    p.add_argument("--loss-bins", default="selected", choices=("selected", "all"),
                   help="keys with a bin of their own: those of the teacher's selected blocks, plus one rest bin "
                        "(default, SPARDA.md §4), or every key of the domain")
    p.add_argument("--cache-positions", type=int, default=0, help="capture the frozen backbone once per training "
                   "sequence at this many sampled query positions and train on those captures (0 = a forward every "
                   "step); see train.captures")
    p.add_argument("--cache-rows", type=int, default=0, help="with --cache-positions: capture only this many "
                   "(seeded) training sequences (0 = all)")
    p.add_argument("--capture-dir", help="with --cache-positions: where the captures live (default: "
                   "runs/capture_cache/<key of the settings>)")
    p.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this much training time")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _validate(args) -> SparseConfig:
    for name in ("steps", "batch", "seq_len", "save_every"):
        if getattr(args, name) <= 0:
            raise SpardaError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.seq_len % 64:
        raise SpardaError(f"--seq-len must be a multiple of 64 (the block size), got {args.seq_len}")
    if args.micro_batch is not None and not (0 < args.micro_batch <= args.batch and args.batch % args.micro_batch == 0):
        raise SpardaError(f"--micro-batch must divide --batch {args.batch}, got {args.micro_batch}")
    if not args.lr > 0:
        raise SpardaError(f"--lr must be positive, got {args.lr}")
    if args.cache_positions < 0 or args.cache_rows < 0:
        raise SpardaError("--cache-positions and --cache-rows must not be negative")
    if args.cache_positions and args.micro_batch is not None:
        raise SpardaError("--micro-batch splits forwards; with --cache-positions there is none to split")
    if (args.cache_rows or args.capture_dir) and not args.cache_positions:
        raise SpardaError("--cache-rows and --capture-dir need --cache-positions")
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise SpardaError(f"--max-minutes must be positive, got {args.max_minutes}")
    if args.model is not None and not Path(args.model).exists():
        raise SpardaError(f"model path does not exist: {args.model}")
    if args.init_from is not None and not Path(args.init_from).is_dir():
        raise SpardaError(f"--init-from: Forecast directory not found: {args.init_from}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SpardaError(f"--out {out} exists and is not a directory")
    if args.resume and not (out / "checkpoints").is_dir():
        raise SpardaError(f"--resume: no checkpoints in {out}")
    return SparseConfig(top_k_blocks=args.top_k_blocks, local_blocks=args.local_blocks)


def training_rows(args, tokenizer) -> np.ndarray:
    from train import data

    if args.data.endswith(".npy") and "," not in args.data:
        if not Path(args.data).exists():
            raise SpardaError(f"token array not found: {args.data}")
        rows = data.load_token_rows(args.data, args.seq_len)
    else:
        packed = data.prepare(args.data, tokenizer, args.seq_len, heldout_fraction=args.heldout_fraction,
                              cache_dir=Path(args.cache_dir) if args.cache_dir else None)
        rows = packed.train
    if rows.size and int(rows.max()) >= tokenizer.vocab_size:
        raise SpardaError(f"token id {int(rows.max())} is outside the model's vocabulary ({tokenizer.vocab_size})")
    return rows


def cached_batches(args, model, sparse, rows: np.ndarray, model_name: str):
    """Captures (a seeded subset of) the training rows once (`train.captures`); returns the rows used and
    `batches(i)`, the i-th batch of their captures."""
    from train.captures import CaptureStore
    from train.data import BatchStream
    from train.loss import default_min_position

    if args.cache_rows and args.cache_rows < len(rows):  # a prefix of one permutation: more rows extend fewer
        rows = rows[np.random.default_rng(args.seed).permutation(len(rows))[:args.cache_rows]]
    start = default_min_position(sparse)
    if args.cache_positions > args.seq_len - start:
        raise SpardaError(f"--cache-positions {args.cache_positions} exceeds the {args.seq_len - start} query "
                          f"positions from {start} on")
    settings = {"model": model_name, "seq_len": args.seq_len, "dtype": args.dtype,
                "positions_per_row": args.cache_positions, "start": start, "seed": args.seed,
                "block_size": sparse.block_size, "compress_kernel": sparse.compress_kernel,
                "compress_stride": sparse.compress_stride}
    store = CaptureStore(args.capture_dir or CaptureStore.default_dir("runs/capture_cache", settings), settings)
    keys = store.build(model, sparse, rows, progress=not args.no_progress)
    stream = BatchStream(np.arange(len(rows))[:, None], args.batch, args.seed)
    return rows, lambda i: store.load([keys[j] for j in stream.batch(i)[:, 0]])


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sparse = _validate(args)

    import jax.numpy as jnp

    from sparda_jax.forecast_checkpoint import load_forecast, save_forecast
    from sparda_jax.model import build_model
    from sparda_jax.tokenizer import load_tokenizer
    from sparda_jax.weights import load_checkpoint
    from train.data import BatchStream

    checkpoint = load_checkpoint(args.model)
    if args.seq_len > checkpoint.config.max_context:
        raise SpardaError(f"--seq-len {args.seq_len} exceeds the model's context of {checkpoint.config.max_context}")
    tokenizer = load_tokenizer(checkpoint)
    rows = training_rows(args, tokenizer)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = build_model(checkpoint.weights, checkpoint.config, dtype=dtype, forecast_init=args.init)
    if args.init_from is not None:
        load_forecast(model, args.init_from)
    if args.cache_positions:
        rows, batches = cached_batches(args, model, sparse, rows, checkpoint.path.name)
    else:
        batches = BatchStream(rows, args.batch, args.seed).batch
    trainer = ForecastTrainer(model, sparse, dataclasses.replace(OptimConfig(), lr=args.lr),
                              micro_batches=args.batch // (args.micro_batch or args.batch), domain=args.loss_domain,
                              bins=args.loss_bins)
    run_info = {"model": str(checkpoint.path.name), "data": args.data, "seq_len": args.seq_len, "batch": args.batch,
                "lr": args.lr, "dtype": args.dtype, "seed": args.seed, "init": args.init,
                "init_from": None if args.init_from is None else str(Path(args.init_from).absolute()),
                "top_k_blocks": args.top_k_blocks, "local_blocks": args.local_blocks,
                "heldout_fraction": args.heldout_fraction, "micro_batch": args.micro_batch or args.batch,
                "loss_domain": args.loss_domain, "loss_bins": args.loss_bins, "cache_positions": args.cache_positions,
                "cache_rows": args.cache_rows,
                "train_sequences": int(len(rows)),
                "forecast_parameters": model.forecast_parameter_count()}
    print(f"training {run_info['forecast_parameters']:,} Forecast parameters on {len(rows)} sequences of "
          f"{args.seq_len} tokens, batch {args.batch}", file=sys.stderr)
    records = run_training(trainer, batches, steps=args.steps, out=Path(args.out), save_every=args.save_every,
                           resume=args.resume, run_info=run_info,
                           max_seconds=None if args.max_minutes is None else args.max_minutes * 60,
                           progress=not args.no_progress)
    last = records[-1] if records else {}
    metadata = dict(run_info, steps=trainer.step, final_loss=last.get("loss"), final_train_recall=last.get("recall"))
    final = save_forecast(trainer.model(), Path(args.out) / "forecast", metadata)
    print(f"saved the Forecast after {trainer.step} steps to {final}", file=sys.stderr)
    return 0


def main() -> None:
    run_main(run)


if __name__ == "__main__":
    main()

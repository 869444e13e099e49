"""`python -m sparda_jax.generate`: generate text with dense, query-sparse or SparDA attention.

Text streams to stdout; timing goes to stderr. Bad input ends in one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparda_jax.config import ATTENTION_MODES, SparseConfig
from sparda_jax.cli import ArgumentParser, run_main
from sparda_jax.errors import SpardaError





def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m sparda_jax.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF file or HF directory (default: the embedded SmolLM2-135M-Instruct)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (used raw unless --chat)")
    prompt.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", default="dense", help=f"one of {', '.join(ATTENTION_MODES)}")
    p.add_argument("--top-k-blocks", type=int, default=SparseConfig.top_k_blocks,
                   help="KV blocks (of 64 tokens) each query attends to, forced ones included")
    p.add_argument("--local-blocks", type=int, default=SparseConfig.local_blocks,
                   help="full blocks before the current one that are always attended")
    p.add_argument("--forecast", help="Forecast checkpoint directory (train.forecast output) for --attention sparda")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="default: bfloat16 on GPU (the Pallas kernels' fast path), float32 elsewhere")
    p.add_argument("--json", action="store_true", help="end stdout with one JSON object describing the run")
    p.add_argument("--offload", action="store_true",
                   help="keep the KV in host memory (infer/ engine; --attention sparse or sparda)")
    p.add_argument("--stats", action="store_true", help="with --offload: per-step hits, misses, bytes, copy/wait time "
                   "on stderr (and in --json)")
    p.add_argument("--host-memory-gb", type=float, help="with --offload: host memory budget for the KV store")
    p.add_argument("--cache-slots", help="with --offload: device slots per sequence and KV head, N >= the top-k "
                   "blocks (more make an LRU block cache) or 'auto' (as many as free device memory holds)")
    return p


def _read_prompt(args) -> str:
    if args.prompt_file is not None:
        try:
            return Path(args.prompt_file).read_text()
        except OSError as e:
            raise SpardaError(f"cannot read prompt file {args.prompt_file}: {e.strerror}") from None
    if args.prompt is None:
        raise SpardaError("give a prompt with --prompt or --prompt-file")
    return args.prompt


def _validate(args) -> SparseConfig:
    if args.attention not in ATTENTION_MODES:
        raise SpardaError(f"unknown attention mode {args.attention!r} (choose from {', '.join(ATTENTION_MODES)})")
    if args.max_new_tokens < 0:
        raise SpardaError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.top_k_blocks < 1 or args.local_blocks < 0:
        raise SpardaError("--top-k-blocks must be >= 1 and --local-blocks >= 0")
    if args.forecast is not None and not Path(args.forecast).exists():
        raise SpardaError(f"Forecast checkpoint not found: {args.forecast}")
    if args.forecast is not None and args.attention != "sparda":
        raise SpardaError("--forecast only applies to --attention sparda")
    if args.offload and args.attention not in ("sparse", "sparda"):
        raise SpardaError("--offload needs --attention sparse or sparda")
    if (args.stats or args.host_memory_gb is not None or args.cache_slots is not None) and not args.offload:
        raise SpardaError("--stats, --host-memory-gb and --cache-slots apply only with --offload")
    if args.cache_slots not in (None, "auto") and not (args.cache_slots.isdigit() and int(args.cache_slots) >= 1):
        raise SpardaError(f"--cache-slots must be a positive number of slots or 'auto', got {args.cache_slots!r}")
    if args.host_memory_gb is not None and not args.host_memory_gb > 0:
        raise SpardaError(f"--host-memory-gb must be > 0, got {args.host_memory_gb}")
    if args.model is not None and not Path(args.model).exists():
        raise SpardaError(f"model path does not exist: {args.model}")
    return SparseConfig(top_k_blocks=args.top_k_blocks, local_blocks=args.local_blocks)


def _cache_slots(flag: str | None) -> int | str | None:
    return flag if flag in (None, "auto") else int(flag)


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sparse = _validate(args)
    prompt_text = _read_prompt(args)
    from sparda_jax.sampling import SamplingConfig

    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)

    # Heavy imports only after the cheap checks, so bad flags fail fast.
    import jax.numpy as jnp

    from sparda_jax import forecast_checkpoint
    from sparda_jax.generation import Generator
    from sparda_jax.model import build_model
    from sparda_jax.tokenizer import load_tokenizer
    from sparda_jax.weights import load_checkpoint

    checkpoint = load_checkpoint(args.model)
    tokenizer = load_tokenizer(checkpoint)
    if args.chat:
        prompt_text = tokenizer.apply_chat_template(prompt_text)
    prompt_ids = tokenizer.encode(prompt_text)
    import jax

    dtype_name = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    model = build_model(checkpoint.weights, checkpoint.config, dtype=dtype)
    if args.attention == "sparda":
        forecast_dir = args.forecast or forecast_checkpoint.default_forecast_for(checkpoint.path)
        if forecast_dir is not None:
            forecast_checkpoint.load_forecast(model, forecast_dir)
    generator = Generator(model, sparse, mode=args.attention)
    generator.check_fits(len(prompt_ids), args.max_new_tokens)
    if args.offload:
        from infer.api import generate as engine_generate

    streamed: list[int] = []
    printed = ""

    def on_token(token_id: int) -> None:
        nonlocal printed
        streamed.append(token_id)
        text = tokenizer.decode(streamed)
        # Hold back a trailing partial UTF-8 character until its next byte arrives.
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text

    if args.offload:
        result = engine_generate(model, sparse, args.attention + "-offload", prompt_ids,
                                 max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                                 stop_ids=tokenizer.eos_ids, on_token=on_token, host_memory_gb=args.host_memory_gb,
                                 cache_slots=_cache_slots(args.cache_slots))
    else:
        result = generator.generate(prompt_ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                    seed=args.seed, stop_ids=tokenizer.eos_ids, on_token=on_token)
    text = tokenizer.decode(result.token_ids)
    sys.stdout.write(text[len(printed):] + "\n")
    step_stats = [s.summary() for s in result.stats] if args.offload and args.stats else None
    if step_stats is not None:
        for s in step_stats:
            took = "pipelined" if s["seconds"] is None else f"{s['seconds'] * 1e3:.1f} ms"
            print(f"[stats] step {s['step']} {s['kind']}: {took} (enqueue {s['dispatch_s'] * 1e3:.1f} ms), "
                  f"hits {s['hits']}, "
                  f"tail {s['tail_hits']}, misses {s['misses']}, {s['bytes'] / 1e6:.3f} MB, "
                  f"copy {s['copy_s'] * 1e3:.2f} ms, waited {s['wait_s'] * 1e3:.2f} ms", file=sys.stderr)
    mode_name = args.attention + ("-offload" if args.offload else "")
    print(f"[{mode_name}] prompt {len(prompt_ids)} tokens, compile {result.compile_s:.2f} s, "
          f"prefill {result.prefill_s:.3f} s, decode {result.decode_tokens_per_s:.1f} tok/s "
          f"({len(result.token_ids)} new tokens, stop: {result.stop_reason})", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "text": text,
            "prompt_token_ids": result.prompt_token_ids,
            "token_ids": result.token_ids,
            "prefill_s": result.prefill_s,
            "decode_tokens_per_s": result.decode_tokens_per_s,
            "compile_s": result.compile_s,
            "stop_reason": result.stop_reason,
            "attention": args.attention,
            "model": str(checkpoint.path),
            "dtype": dtype_name,
            **({"offload": True} if args.offload else {}),
            **({"stats": step_stats} if step_stats is not None else {}),
        }))
    return 0


def main() -> None:
    run_main(run)


if __name__ == "__main__":
    main()

"""The two CLIs end to end on a tiny HF-format model written here, and their one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparda_jax.errors import SpardaError

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 2


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A llama-type HF directory: config.json, random weights in model.safetensors, a byte-level tokenizer."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny_model")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    hidden, inter, heads, kv, hd, v = 32, 48, 4, 2, 8, len(vocab)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": v, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": LAYERS, "num_attention_heads": heads, "num_key_value_heads": kv,
        "max_position_embeddings": 1024, "tie_word_embeddings": True, "rope_theta": 10000.0}))
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.normal(size=shape) * 0.2).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(v, hidden), "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": np.ones(hidden, np.float32),
                    p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
                    p + "self_attn.q_proj.weight": w(heads * hd, hidden),
                    p + "self_attn.k_proj.weight": w(kv * hd, hidden),
                    p + "self_attn.v_proj.weight": w(kv * hd, hidden),
                    p + "self_attn.o_proj.weight": w(hidden, heads * hd),
                    p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
                    p + "mlp.down_proj.weight": w(hidden, inter)}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = np.random.default_rng(1)
    words = ["the", "river", "ran", "past", "a", "mill", "where", "Anne", "waited", "for", "news", "."]
    path = tmp_path_factory.mktemp("text") / "story.txt"
    path.write_text(" ".join(rng.choice(words, 3000)))
    return path


def test_train_resume_and_eval_end_to_end(tiny_model_dir, text_file, tmp_path):
    from sparda_jax.forecast_checkpoint import forecast_arrays, load_forecast
    from sparda_jax.model import build_model
    from sparda_jax.weights import load_checkpoint
    from train import eval_forecast, forecast

    out = tmp_path / "run"
    common = ["--model", str(tiny_model_dir), "--data", str(text_file), "--batch", "2", "--seq-len", "256",
              "--out", str(out), "--save-every", "2", "--top-k-blocks", "4", "--local-blocks", "1",
              "--cache-dir", "", "--no-progress", "--lr", "0.01", "--heldout-fraction", "0"]
    assert forecast.run(common + ["--steps", "2"]) == 0
    assert forecast.run(common + ["--steps", "3", "--resume"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and 0 <= r["recall"] <= 1 for r in log)

    # The final Forecast loads into a freshly built model (what `generate --forecast DIR` does).
    ckpt = load_checkpoint(tiny_model_dir)
    model = build_model(ckpt.weights, ckpt.config)
    before = forecast_arrays(model)
    meta = load_forecast(model, out / "forecast")
    assert meta["steps"] == 3 and meta["seq_len"] == 256
    after = forecast_arrays(model)
    assert any(not np.array_equal(before[k], after[k]) for k in before)

    result = eval_forecast.run(["--model", str(tiny_model_dir), "--forecast", str(out / "forecast"),
                                "--compare", str(out / "forecast"),
                                "--text-file", str(text_file), "--seq-len", "512", "--num-seqs", "2",
                                "--top-k-blocks", "4", "--local-blocks", "1", "--min-position", "256",
                                "--out", str(tmp_path / "eval"), "--no-progress"])
    for method in ("forecast", "compare", "query_mean", "reuse"):
        assert len(result["recall"][method]["per_layer"]) == LAYERS
    # the Forecast compared with itself scores the same, and unlike the untrained init
    assert result["recall"]["compare"] == result["recall"]["forecast"] != result["recall"]["query_mean"]
    assert result["recall"]["reuse"]["per_layer"][0] is None
    ppl = result["perplexity"]
    assert set(ppl) == {"prefill", "per_token"}
    assert ppl["per_token"]["sparda_compare"] == pytest.approx(ppl["per_token"]["sparda"], rel=1e-6)
    assert ppl["prefill"]["dense"] == pytest.approx(ppl["per_token"]["dense"], rel=1e-4)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["settings"]["sequences"] == 2 and saved["settings"]["min_position"] == 256
    assert (tmp_path / "eval" / "recall_per_layer.png").stat().st_size > 1000


def test_init_from_starts_where_an_earlier_forecast_ended(tiny_model_dir, text_file, tmp_path):
    from sparda_jax.forecast_checkpoint import forecast_arrays, load_forecast, save_forecast
    from sparda_jax.model import build_model
    from sparda_jax.weights import load_checkpoint
    from train import forecast

    ckpt = load_checkpoint(tiny_model_dir)
    start = build_model(ckpt.weights, ckpt.config, forecast_init="uniform", seed=7)
    save_forecast(start, tmp_path / "start")
    common = ["--model", str(tiny_model_dir), "--data", str(text_file), "--batch", "2", "--seq-len", "256",
              "--steps", "1", "--cache-dir", "", "--no-progress", "--heldout-fraction", "0", "--lr", "1e-9",
              "--top-k-blocks", "4", "--local-blocks", "1"]
    assert forecast.run(common + ["--out", str(tmp_path / "a"), "--init-from", str(tmp_path / "start")]) == 0
    assert forecast.run(common + ["--out", str(tmp_path / "b")]) == 0
    expected = forecast_arrays(start)
    for run_dir, should_match in (("a", True), ("b", False)):
        model = build_model(ckpt.weights, ckpt.config)
        load_forecast(model, tmp_path / run_dir / "forecast")
        got = forecast_arrays(model)
        # One step at lr 1e-9 moves no weight by more than ~1e-9 (Adam's step is about lr).
        close = all(np.allclose(got[k], expected[k], rtol=0, atol=1e-6) for k in expected)
        assert close == should_match, run_dir


def test_cached_training_end_to_end(tiny_model_dir, text_file, tmp_path):
    from train import forecast

    out, caps = tmp_path / "run", tmp_path / "caps"
    common = ["--model", str(tiny_model_dir), "--data", str(text_file), "--batch", "2", "--seq-len", "512",
              "--out", str(out), "--save-every", "2", "--top-k-blocks", "4", "--local-blocks", "1", "--cache-dir", "",
              "--no-progress", "--heldout-fraction", "0", "--cache-positions", "32", "--cache-rows", "3",
              "--capture-dir", str(caps)]
    assert forecast.run(common + ["--steps", "2"]) == 0
    rows = sorted(caps.glob("row-*.npz"))
    stamps = [p.stat().st_mtime_ns for p in rows]
    assert len(rows) == 3
    assert forecast.run(common + ["--steps", "3", "--resume"]) == 0
    assert [p.stat().st_mtime_ns for p in rows] == stamps  # the captures were reused, not made again
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    info = json.loads((out / "run.json").read_text())
    assert (info["cache_positions"], info["cache_rows"], info["loss_domain"]) == (32, 3, "nonforced")
    with pytest.raises(SpardaError, match="loss_domain was 'nonforced', now 'paper'"):
        forecast.run(common + ["--steps", "4", "--resume", "--loss-domain", "paper"])


def _cli(module, *args):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, proc.stderr.strip()


@pytest.mark.parametrize("args, message", [
    (["--out", "x", "--steps", "0"], "--steps must be positive"),
    (["--out", "x", "--seq-len", "100"], "multiple of 64"),
    (["--out", "x", "--model", "/nonexistent/model.gguf"], "model path does not exist"),
    (["--out", "x", "--dtype", "float16"], "invalid choice"),
    ([], "required: --out"),
    (["--out", "x", "--init-from", "/nonexistent/forecast"], "Forecast directory not found"),
    (["--out", "x", "--batch", "4", "--micro-batch", "3"], "--micro-batch must divide --batch 4"),
    (["--out", "x", "--cache-rows", "4"], "need --cache-positions"),
    (["--out", "x", "--cache-positions", "8", "--batch", "4", "--micro-batch", "2"], "there is none to split"),
    (["--out", "x", "--cache-positions", "-1"], "must not be negative"),
    (["--out", "x", "--loss-domain", "everything"], "invalid choice"),
])
def test_train_cli_errors_are_one_line(args, message):
    code, err = _cli("train.forecast", *args)
    assert code == 2
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_eval_cli_succeeds_with_exit_code_zero(tiny_model_dir, text_file, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "train.eval_forecast", "--model", str(tiny_model_dir),
                           "--forecast", str(_shipped_like(tiny_model_dir, tmp_path)), "--text-file", str(text_file),
                           "--seq-len", "512", "--num-seqs", "1", "--top-k-blocks", "4", "--local-blocks", "1",
                           "--ppl", "none", "--out", str(tmp_path / "eval"), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "recall@k mean" in proc.stderr and "{'recall'" not in proc.stderr  # a summary, not the result dict
    assert (tmp_path / "eval" / "eval.json").exists()


def _shipped_like(model_dir, tmp_path):
    from sparda_jax.forecast_checkpoint import save_forecast
    from sparda_jax.model import build_model
    from sparda_jax.weights import load_checkpoint

    ckpt = load_checkpoint(model_dir)
    return save_forecast(build_model(ckpt.weights, ckpt.config), tmp_path / "forecast")


def test_eval_cli_errors_are_one_line(tmp_path):
    code, err = _cli("train.eval_forecast", "--forecast", str(tmp_path / "missing"))
    assert code == 2 and err.startswith("error: ") and "not found" in err and "\n" not in err
    code, err = _cli("train.eval_forecast", "--seq-len", "65")
    assert code == 2 and "multiple of 64" in err
    code, err = _cli("train.eval_forecast", "--ppl", "sideways")
    assert code == 2 and "unknown --ppl" in err


def test_resume_without_checkpoints_and_bad_data_are_clear(tiny_model_dir, tmp_path):
    from train import forecast

    with pytest.raises(SpardaError, match="no checkpoints"):
        forecast.run(["--out", str(tmp_path / "none"), "--resume"])
    with pytest.raises(SpardaError, match="unknown data source"):
        forecast.run(["--model", str(tiny_model_dir), "--data", "nowhere", "--out", str(tmp_path / "r"),
                      "--seq-len", "256", "--cache-dir", ""])
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(SpardaError, match="fewer than the batch size"):
        forecast.run(["--model", str(tiny_model_dir), "--data", str(short), "--out", str(tmp_path / "s"),
                      "--seq-len", "256", "--cache-dir", "", "--heldout-fraction", "0"])

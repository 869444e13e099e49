"""`python -m sparda_jax.generate`: the JSON contract and one clear error line (exit 2) for every bad input."""

import json
import subprocess
import sys

import pytest


def generate(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "sparda_jax.generate", *args], capture_output=True, text=True,
                          timeout=timeout, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})


def assert_clear_error(result, fragment):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert result.stdout == ""


@pytest.fixture
def corrupt_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a model")
    return path


@pytest.mark.parametrize("args, fragment", [
    (["--model", "/nonexistent/model.gguf", "--prompt", "hi"], "does not exist"),
    (["--prompt", "hi", "--max-new-tokens", "-1"], "max-new-tokens"),
    (["--prompt", "hi", "--temperature", "-0.5"], "temperature"),
    (["--prompt", "hi", "--top-p", "0"], "top-p"),
    (["--prompt", "hi", "--top-p", "1.01"], "top-p"),
    (["--prompt", "hi", "--top-k", "-3"], "top-k"),
    (["--prompt", "hi", "--attention", "bogus"], "unknown attention mode"),
    (["--prompt", "hi", "--top-k-blocks", "0"], "top-k-blocks"),
    (["--prompt", "hi", "--top-k-blocks", "4", "--local-blocks", "8"], "forced"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "cannot read prompt file"),
    (["--prompt", "hi", "--attention", "sparda", "--forecast", "/nonexistent/ckpt"], "Forecast checkpoint not found"),
    (["--prompt", "hi", "--max-new-tokens", "lots"], "invalid int value"),
    (["--prompt", "hi", "--no-such-flag"], "unrecognized arguments"),
    ([], "give a prompt"),
])
def test_bad_flags(args, fragment):
    assert_clear_error(generate(*args), fragment)


def test_corrupt_gguf(corrupt_gguf):
    assert_clear_error(generate("--model", str(corrupt_gguf), "--prompt", "hi"), "cannot read GGUF")


def test_prompt_beyond_the_context():
    assert_clear_error(generate("--prompt", "hi", "--max-new-tokens", "9000"), "exceeds the model's context")


def test_forecast_directory_that_is_not_a_checkpoint(tmp_path):
    assert_clear_error(generate("--prompt", "hi", "--attention", "sparda", "--forecast", str(tmp_path)),
                       "not a Forecast checkpoint")


def test_json_output_and_streamed_text(tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("What is the capital of France?")
    result = generate("--prompt-file", str(prompt), "--chat", "--max-new-tokens", "7", "--json",
                      "--attention", "sparda")
    assert result.returncode == 0, result.stderr
    *streamed, last = result.stdout.strip().splitlines()
    data = json.loads(last)
    assert {"text", "prompt_token_ids", "token_ids", "prefill_s", "decode_tokens_per_s"} <= data.keys()
    assert len(data["token_ids"]) == 7 and data["prompt_token_ids"][0] == 1  # <|im_start|>
    assert "Paris" in data["text"] and "\n".join(streamed).strip() == data["text"].strip()
    assert "decode" in result.stderr and "tok/s" in result.stderr
    assert data["dtype"] == "float32"  # the default off a GPU

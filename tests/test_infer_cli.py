"""`python -m sparda_jax.generate --offload` on the real default model (SmolLM2): same greedy tokens as without."""

import json
import subprocess
import sys

import pytest

from sparda_jax import generate

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who " * 12


def _run_json(capsys, *extra):
    assert generate.run(["--prompt", PROMPT, "--max-new-tokens", "6", "--top-k-blocks", "6", "--local-blocks", "2",
                         "--json", *extra]) == 0
    out = capsys.readouterr()
    return json.loads(out.out.strip().splitlines()[-1]), out.err


def test_offload_matches_resident_sparda(capsys):
    ref, _ = _run_json(capsys, "--attention", "sparda")
    got, err = _run_json(capsys, "--attention", "sparda", "--offload", "--stats")
    assert got["token_ids"] == ref["token_ids"]
    assert got["offload"] and len(got["stats"]) == 6  # prefill + 5 decode steps
    assert "[stats] step 1 decode" in err and "misses" in err
    # a block cache (2k slots) changes what moves, never the tokens
    cached, _ = _run_json(capsys, "--attention", "sparda", "--offload", "--stats", "--cache-slots", "12")
    assert cached["token_ids"] == ref["token_ids"]
    misses = [sum(s["misses"] for s in run["stats"][1:]) for run in (got, cached)]
    assert misses[1] <= misses[0], misses


def test_sampled_offload_matches_resident_sparda_with_the_same_seed(capsys):
    """The offload path samples in multi-step programs, token i with key i of the seed, as the resident loop does."""
    sampled = ("--temperature", "0.9", "--seed", "3")
    ref, _ = _run_json(capsys, "--attention", "sparda", *sampled)
    got, _ = _run_json(capsys, "--attention", "sparda", "--offload", *sampled)
    greedy, _ = _run_json(capsys, "--attention", "sparda")
    assert got["token_ids"] == ref["token_ids"] != greedy["token_ids"]


@pytest.mark.parametrize("args,message", [
    (["--attention", "dense", "--offload"], "--offload needs --attention sparse or sparda"),
    (["--attention", "sparse", "--stats"], "only with --offload"),
    (["--attention", "sparse", "--offload", "--host-memory-gb", "0.00001"], "host KV store needs"),
    (["--attention", "sparse", "--cache-slots", "32"], "only with --offload"),
    (["--attention", "sparse", "--offload", "--cache-slots", "0"], "--cache-slots must be a positive number"),
    (["--attention", "sparse", "--offload", "--cache-slots", "many"], "--cache-slots must be a positive number"),
])
def test_offload_errors(args, message):
    proc = subprocess.run([sys.executable, "-m", "sparda_jax.generate", "--prompt", "hi", *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr

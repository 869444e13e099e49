"""The locality replay used by the benchmarks reproduces the drift it is given, as the numpy trace analysis
(`locality_from_trace`, the code that measured the real model) sees it; forced blocks are always selected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer.locality import (ReplaySelector, ReplayTrace, device_replay, locality_from_trace, replay_trace,
                            trace_hook)

TOP_K, LOCAL, BLOCK, LAYERS, BATCH, KVH = 24, 4, 64, 3, 2, 2
STATS = {"layers": [{"drift": 0.05, "recur": 0.6}, {"drift": 0.25, "recur": 0.9}, {"drift": 0.6, "recur": 0.9}]}
START, STEPS, BURN_IN = 400 * BLOCK, 100, 32


def device_trace(burn_in=BURN_IN):
    """Like the real model's recorded trace, the measured steps follow a history they do not show (there: the
    prompt; here: burn-in steps, as `replay_trace` runs them)."""
    hook, state = device_replay(STATS, LAYERS, BATCH, KVH, TOP_K, LOCAL, START)

    @jax.jit
    def step(state, positions):
        ids = jnp.zeros((BATCH, KVH, TOP_K), jnp.int32)
        out = []
        for layer in range(LAYERS):
            sel, state = hook(layer, ids, positions, state)
            out.append(sel)
        return out, state

    for _ in range(burn_in):
        _, state = step(state, jnp.full(BATCH, START, jnp.int32))
    trace = []
    for s in range(STEPS):
        ids, state = step(state, jnp.full(BATCH, START + s, jnp.int32))
        trace.append([np.asarray(x) for x in ids])
    return trace


def host_trace(burn_in=BURN_IN):
    replay = ReplaySelector(STATS, LAYERS, BATCH, KVH, TOP_K, LOCAL)
    for _ in range(burn_in):
        [replay(layer, None, np.full(BATCH, START)) for layer in range(LAYERS)]
    return [[replay(layer, None, np.full(BATCH, START + s)) for layer in range(LAYERS)] for s in range(STEPS)]


@pytest.mark.parametrize("make_trace", [device_trace, host_trace], ids=["device", "host"])
def test_replay_reproduces_drift_and_keeps_forced_blocks(make_trace):
    trace = make_trace()
    positions = [np.full(BATCH, START + s) for s in range(STEPS)]
    cur = positions[-1][0] // BLOCK
    for sel in trace[-1]:
        assert sel.min() >= 0 and sel.max() <= cur
        for row in sel.reshape(-1, TOP_K):
            assert {0, *range(cur - LOCAL, cur + 1)} <= set(row.tolist())
            assert len(set(row.tolist())) == TOP_K
    measured = locality_from_trace(trace, positions, TOP_K, LOCAL, BLOCK, cache_factors=(1,))
    for given, got in zip(STATS["layers"], measured["layers"]):
        assert abs(got["drift"] - given["drift"]) < 0.03, (given, got)
        # Recurrence is measured within the trace, so a block last seen before it (in the burn-in) counts as new,
        # as it does in the real model's trace; with few drops per step (drift 0.05) that bias dominates.
        if given["drift"] >= 0.2:
            assert abs(got["recur"] - given["recur"]) < 0.05, (given, got)


def test_a_shared_trace_extended_later_is_the_host_replay_with_burn_in():
    """Benchmark runs share one ReplayTrace: a short take, then a longer one that draws only the missing steps, must
    give the same selections as one host replay (burn-in included) drawn in a single pass."""
    expected = np.array(host_trace())
    trace = ReplayTrace(STATS, LAYERS, BATCH, KVH, TOP_K, LOCAL, START, burn_in=BURN_IN)
    short = trace.take(7)
    np.testing.assert_array_equal(short, expected[:7])
    np.testing.assert_array_equal(trace.take(STEPS), expected)
    np.testing.assert_array_equal(trace.take(3), expected[:3])


def test_trace_hook_plays_the_host_replay():
    """The precomputed trace, played by `trace_hook`, gives at every step the selections the host replay makes
    (same seed), and wraps around after its last step. Both offload modes plan layers 0, 1, ..., L-1 in order."""
    steps = 6
    expected = host_trace(burn_in=0)[:steps]
    hook, state = trace_hook(replay_trace(STATS, LAYERS, BATCH, KVH, TOP_K, LOCAL, START, steps, burn_in=0))

    @jax.jit
    def step(state):
        ids = jnp.zeros((BATCH, KVH, TOP_K), jnp.int32)
        out = []
        for layer in range(LAYERS):
            sel, state = hook(layer, ids, jnp.zeros(BATCH, jnp.int32), state)
            out.append(sel)
        return out, state

    for s in range(steps + 2):
        got, state = step(state)
        for layer in range(LAYERS):
            np.testing.assert_array_equal(np.asarray(got[layer]), expected[s % steps][layer], err_msg=f"step {s}")


def test_cli_rejects_a_missing_forecast_in_one_line(tmp_path):
    import subprocess
    import sys

    text = tmp_path / "t.txt"
    text.write_text("some text " * 100)
    proc = subprocess.run([sys.executable, "-m", "infer.locality", "--text", str(text), "--forecast",
                           str(tmp_path / "missing"), "--out", str(tmp_path / "loc.json")],
                          capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.startswith("error: ") and "not found" in err and "\n" not in err
    assert not (tmp_path / "loc.json").exists()

"""`decode_loop`: the one-step-ahead token loop shared by the resident and offload generators; `greedy_program_loop`:
the fused engine's greedy loop of multi-step programs."""

import jax.numpy as jnp
import numpy as np

from infer.api import greedy_program_loop

from sparda_jax.generation import decode_loop


def _counting_steps(sequence):
    """enqueue_step that returns the sequence's next token and records which steps were enqueued, and from what."""
    calls = []

    def enqueue_step(step, token):
        calls.append((step, int(token[0])))
        return jnp.asarray([sequence[step]])

    return enqueue_step, calls


def test_stops_at_eos_and_enqueues_one_step_past_it():
    seq = [5, 6, 7, 2, 9, 9]  # token 2 is the stop token
    enqueue, calls = _counting_steps(seq)
    streamed = []
    ids, reason = decode_loop(jnp.asarray([seq[0]]), enqueue, max_new_tokens=6, stop_ids=(2,),
                              on_token=streamed.append)
    assert (ids, reason) == ([5, 6, 7], "eos")
    assert streamed == [5, 6, 7]
    # step t+1 is enqueued before token t is read: step 4 was enqueued from the stop token, then discarded
    assert calls == [(1, 5), (2, 6), (3, 7), (4, 2)]


def test_length_limit_enqueues_exactly_the_steps_it_uses():
    seq = [1, 3, 4, 8]
    enqueue, calls = _counting_steps(seq)
    ids, reason = decode_loop(jnp.asarray([seq[0]]), enqueue, max_new_tokens=3, stop_ids=(), on_token=None)
    assert (ids, reason) == ([1, 3, 4], "length")
    assert calls == [(1, 1), (2, 3)]


class _ScriptedGreedyEngine:
    """decode_greedy that plays a fixed token sequence (a block of 4) and records each program's (first token, steps)."""

    def __init__(self, sequence):
        self.sparse = type("Sparse", (), {"block_size": 4})()
        self.sequence, self.done, self.calls = sequence, 1, []

    def decode_greedy(self, tokens, num_steps):
        self.calls.append((int(tokens[0]), num_steps))
        out = np.asarray(self.sequence[self.done:self.done + num_steps])[:, None]
        self.done += num_steps
        return out


def test_greedy_programs_run_a_block_at_a_time_up_to_max_new_tokens():
    engine = _ScriptedGreedyEngine(list(range(10, 30)))
    streamed = []
    ids, reason = greedy_program_loop(engine, 10, max_new_tokens=10, stop_ids=(), on_token=streamed.append)
    assert (ids, reason) == (list(range(10, 20)), "length") and streamed == ids
    # 9 decode steps after the prefill's token: programs of 4, 4, 1, each fed the previous program's last token
    assert engine.calls == [(10, 4), (14, 4), (18, 1)]


def test_greedy_programs_stop_at_eos_inside_a_program():
    engine = _ScriptedGreedyEngine([5, 6, 2, 7, 8, 9])
    ids, reason = greedy_program_loop(engine, 5, max_new_tokens=6, stop_ids=(2,), on_token=None)
    assert (ids, reason) == ([5, 6], "eos")
    assert engine.calls == [(5, 4)]  # the program ran past the stop token; its last steps are discarded

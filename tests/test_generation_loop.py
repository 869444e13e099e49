"""`decode_loop`: the one-step-ahead token loop shared by the resident and offload generators; `program_loop`:
the fused engine's loop of multi-step programs."""

import jax.numpy as jnp
import numpy as np

from infer.api import program_loop

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


def _scripted_program(sequence):
    """run_program that plays a fixed token sequence and records each program's (fed token, first index, steps)."""
    calls = []

    def run_program(token, index, n):
        calls.append((token, index, n))
        return np.asarray(sequence[index:index + n])

    return run_program, calls


def test_programs_run_a_block_at_a_time_up_to_max_new_tokens():
    run_program, calls = _scripted_program(list(range(10, 30)))
    streamed = []
    ids, reason = program_loop(run_program, 10, max_new_tokens=10, block_size=4, stop_ids=(),
                               on_token=streamed.append)
    assert (ids, reason) == (list(range(10, 20)), "length") and streamed == ids
    # 9 decode steps after the prefill's token: programs of 4, 4, 1, each fed the previous program's last token and
    # told the index of its first token (the sampling key it starts with)
    assert calls == [(10, 1, 4), (14, 5, 4), (18, 9, 1)]


def test_programs_stop_at_eos_inside_a_program():
    run_program, calls = _scripted_program([5, 6, 2, 7, 8, 9])
    ids, reason = program_loop(run_program, 5, max_new_tokens=6, block_size=4, stop_ids=(2,), on_token=None)
    assert (ids, reason) == ([5, 6], "eos")
    assert calls == [(5, 1, 4)]  # the program ran past the stop token; its last steps are discarded

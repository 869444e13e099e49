"""`decode_loop`: the one-step-ahead token loop shared by the resident and offload generators."""

import jax.numpy as jnp

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

"""Compiler options of the multi-step decode programs (a `fori_loop` of decode steps inside one jit), shared by the
resident engine and the fused offload engine."""

from __future__ import annotations

import os

from sparda_jax.errors import SpardaError

# The multi-step program's loop has a traced trip count. XLA's default command-buffer types leave such a loop to the
# host: a predicate read and an enqueue every step, no faster than `decode` (H200, 32K B=1: 7.35 ms of host time a
# step). With WHILE and CONDITIONAL among them the loop runs inside one CUDA graph (0.10 ms a step).
LOOP_GRAPH_COMMANDS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"


def multi_step_options(step_options: dict, on_gpu: bool, xla_flags: str | None = None) -> dict:
    """The multi-step program's compiler options: the step's, plus (on a GPU) LOOP_GRAPH_COMMANDS and the
    CONCURRENT graph order, each unless the step's options or XLA_FLAGS set it (a per-jit option would override
    XLA_FLAGS)."""
    xla_flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    options = dict(step_options)
    if not on_gpu:
        return options
    if "xla_gpu_enable_command_buffer=" not in xla_flags:
        options["xla_gpu_enable_command_buffer"] = LOOP_GRAPH_COMMANDS
    if "xla_gpu_command_buffer_scheduling_mode=" not in xla_flags:
        options.setdefault("xla_gpu_command_buffer_scheduling_mode", "CONCURRENT")
    return options


def check_program_length(num_steps: int, last_position: int, max_len: int) -> None:
    """The checks of a `decode_greedy` / `decode_sampled` call, before anything runs: at least one step, and room
    for all of them in the context."""
    if num_steps < 1:
        raise SpardaError(f"num_steps must be >= 1, got {num_steps}")
    if last_position + num_steps > max_len:
        raise SpardaError(f"context {max_len} cannot hold {num_steps} more tokens after {last_position}")

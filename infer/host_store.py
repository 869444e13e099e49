"""Host KV store: the full KV of every layer in host memory (pinned on GPU machines, plain numpy on CPU).

Layout per layer: [B, KV, NB, 2, S, D], so one block (K then V) of one (sequence, KV head) is one contiguous
2*S*D run; `flat(layer)` views it as [B*KV*NB, 2*S*D] rows that the gathers index with
`row = (b * KV + kv) * NB + block`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from sparda_jax.errors import SpardaError


def available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_host_budget(nbytes: int, host_memory_gb: float | None) -> None:
    """Raises SpardaError (before anything is allocated) when the KV cannot fit the budget or the machine."""
    if host_memory_gb is not None:
        if host_memory_gb <= 0:
            raise SpardaError(f"--host-memory-gb must be > 0, got {host_memory_gb}")
        budget = host_memory_gb * 1e9
        if nbytes > budget:
            raise SpardaError(f"the host KV store needs {nbytes / 1e9:.2f} GB but --host-memory-gb is "
                              f"{host_memory_gb:g} GB; lower the batch or the context, or raise the budget")
    avail = available_host_bytes()
    if nbytes > 0.95 * avail:
        raise SpardaError(f"the host KV store needs {nbytes / 1e9:.2f} GB but only {avail / 1e9:.2f} GB of host "
                          "memory is available")


def _numpy_dtype(dtype: Any) -> np.dtype:
    import jax.numpy as jnp

    return np.dtype(jnp.dtype(dtype))


class HostKVStore:
    """Allocates [L, B, KV, NB, 2, S, D]; `pinned` says whether the memory is page-locked (CUDA host memory)."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, block_size: int, head_dim: int,
                 dtype: Any, *, host_memory_gb: float | None = None, pin: bool | None = None):
        if max_len % block_size:
            raise SpardaError(f"context {max_len} must be a multiple of the block size {block_size}")
        self.dtype = _numpy_dtype(dtype)
        self.shape = (num_layers, batch, kv_heads, max_len // block_size, 2, block_size, head_dim)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        check_host_budget(self.nbytes, host_memory_gb)
        self.num_layers, self.batch, self.kv_heads = num_layers, batch, kv_heads
        self.num_blocks, self.block_size, self.head_dim = max_len // block_size, block_size, head_dim
        self.row_elems = 2 * block_size * head_dim
        self.pinned = False
        self._torch = None  # keeps the pinned tensor alive
        if pin is None:
            import jax

            pin = jax.default_backend() == "gpu"
        self.data = self._allocate(pin)

    def _allocate(self, pin: bool) -> np.ndarray:
        if pin:
            try:
                import torch

                raw = torch.empty(self.nbytes // 2, dtype=torch.int16, pin_memory=True)
                self._torch = raw
                self.pinned = True
                return raw.numpy().view(self.dtype).reshape(self.shape)
            except Exception:  # no torch / no CUDA: fall back to pageable memory (slower copies)
                self._torch = None
        return np.empty(self.shape, self.dtype)

    def view(self, batch: int) -> "HostKVStore":
        """The first `batch` sequences of this store, sharing its memory (benchmarks reuse one allocation)."""
        import copy

        if batch > self.batch:
            raise SpardaError(f"store holds {self.batch} sequences, {batch} requested")
        v = copy.copy(self)
        v.data = self.data[:, :batch]
        v.batch = batch
        v.shape = v.data.shape
        v.nbytes = self.nbytes // self.batch * batch
        return v

    def fill(self, seed: int = 0, threads: int = 16) -> None:
        """Non-zero pseudo-random content (benchmarks never time on zeros), written by several threads."""
        import concurrent.futures as cf

        rng = np.random.default_rng(seed)
        pattern = rng.standard_normal(1 << 20).astype(np.float32).astype(self.dtype)
        layers = [self.data[i].reshape(-1) for i in range(self.num_layers)]

        def one(flat):
            n = pattern.shape[0]
            for i in range(0, flat.shape[0], n):
                flat[i:i + n] = pattern[:min(n, flat.shape[0] - i)]

        with cf.ThreadPoolExecutor(threads) as ex:
            list(ex.map(one, layers))

    def layer(self, layer: int) -> np.ndarray:
        return self.data[layer]

    def flat(self, layer: int) -> np.ndarray:
        return self.data[layer].reshape(-1, self.row_elems)  # a view: data[layer] is contiguous

    def row_ids(self, b: np.ndarray, kv: np.ndarray, block: np.ndarray) -> np.ndarray:
        return ((b * self.kv_heads + kv) * self.num_blocks + block).astype(np.int64)

    def write_tokens(self, layer: int, k: np.ndarray, v: np.ndarray, start: int) -> None:
        """k, v: [B, KV, T, D] written at token `start` (a multiple of the block size)."""
        s = self.block_size
        b, kvh, t, d = k.shape
        nb = -(-t // s)
        if nb * s != t:
            pad = [(0, 0), (0, 0), (0, nb * s - t), (0, 0)]
            k, v = np.pad(k, pad), np.pad(v, pad)
        dst = self.data[layer][:, :, start // s: start // s + nb]
        dst[:, :, :, 0] = k.reshape(b, kvh, nb, s, d)
        dst[:, :, :, 1] = v.reshape(b, kvh, nb, s, d)

    def torch_layer(self, layer: int):
        """The pinned torch tensor of one layer (for zero-copy jax arrays through DLPack), or None."""
        if self._torch is None:
            return None
        per_layer = self._torch.numel() // self.num_layers  # of the whole allocation (a view shares it)
        return self._torch[layer * per_layer:(layer + 1) * per_layer]

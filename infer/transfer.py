"""Transfer path `host-gather` of the layer-wise engine: worker threads gather the missed rows into a pinned staging
buffer (numpy `take`, split over threads because one thread gathers only a few GB/s), then one `jax.device_put` moves
them over PCIe on a copy engine, which overlaps the compute stream. `submit` runs it on the prefetch thread.

Returns [Mpad, 2*S*D] device arrays whose first M rows are the requested rows (Mpad a power of two >= 16, so a few
shapes cover every miss count), plus a `CopyRecord`. The other path, `zero-copy`, is the fused engine
(`infer.fused`, kernel in `infer.zero_copy`).
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from infer.host_store import HostKVStore


def bucket(m: int) -> int:
    return max(16, 1 << max(m - 1, 0).bit_length())


@dataclasses.dataclass
class CopyRecord:
    rows: int = 0
    bytes: int = 0
    gather_s: float = 0.0  # host gather into staging
    copy_s: float = 0.0  # gather + host->device until the data is on the device (path a); dispatch only (path b)


class HostGatherFetcher:
    """Path (a). `fetch` is synchronous (the caller's thread); `submit` runs it on the prefetch thread."""

    name = "host-gather"

    def __init__(self, store: HostKVStore, max_rows: int, *, threads: int = 8, staging: str = "auto"):
        self.store = store
        self.device = jax.devices()[0]
        self.on_gpu = self.device.platform == "gpu"
        self.threads = max(1, threads)
        self._gather_pool = cf.ThreadPoolExecutor(self.threads, thread_name_prefix="sparda-gather")
        self._prefetch = cf.ThreadPoolExecutor(1, thread_name_prefix="sparda-prefetch")
        self.max_rows = bucket(max_rows)
        self.staging_kind = self._pick_staging(staging)
        self._buffers: dict[int, list] = {}  # bucket -> ring of (numpy view, jax array or None)
        self._ring: dict[int, int] = {}
        self._lock = threading.Lock()
        self.closed = False

    def _pick_staging(self, staging: str) -> str:
        if not self.on_gpu:
            return "numpy"
        if staging != "auto":
            return staging
        return "jax_pinned"

    def _alloc(self, rows: int):
        shape = (rows, self.store.row_elems)
        dtype = self.store.dtype
        if self.staging_kind == "jax_pinned":
            # A pinned_host jax array, written in place through its address (we own it; jax never reads it
            # concurrently with our writes because each ring entry is reused only after its copy completed).
            sharding = jax.sharding.SingleDeviceSharding(self.device, memory_kind="pinned_host")
            arr = jax.device_put(np.zeros(shape, dtype), sharding)
            arr.block_until_ready()
            nbytes = int(np.prod(shape)) * dtype.itemsize
            raw = (ctypes.c_uint8 * nbytes).from_address(arr.unsafe_buffer_pointer())
            return np.frombuffer(raw, dtype=dtype).reshape(shape), arr
        if self.staging_kind == "torch":
            import torch

            t = torch.empty(int(np.prod(shape)), dtype=torch.int16, pin_memory=True)
            return t.numpy().view(dtype).reshape(shape), t
        return np.empty(shape, dtype), None

    def _staging(self, rows: int):
        with self._lock:
            if rows not in self._buffers:
                self._buffers[rows] = [self._alloc(rows) for _ in range(2)]
                self._ring[rows] = 0
            i = self._ring[rows]
            self._ring[rows] = (i + 1) % 2
            return self._buffers[rows][i]

    def _gather(self, layer: int, rows: np.ndarray, out: np.ndarray) -> None:
        src = self.store.flat(layer)
        n = rows.shape[0]
        if n == 0:
            return
        parts = min(self.threads, max(1, n // 8))
        if parts == 1:
            np.take(src, rows, axis=0, out=out[:n])
            return
        bounds = np.linspace(0, n, parts + 1).astype(int)
        futures = [self._gather_pool.submit(np.take, src, rows[a:b], 0, out[a:b])
                   for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        for f in futures:
            f.result()

    def fetch(self, layer: int, rows: np.ndarray):
        rec = CopyRecord(rows=int(rows.shape[0]), bytes=int(rows.shape[0]) * self.store.row_elems
                         * self.store.dtype.itemsize)
        if rec.rows == 0:
            return None, rec
        t0 = time.perf_counter()
        m = bucket(rec.rows)
        view, handle = self._staging(m)
        self._gather(layer, rows, view)
        if m > rec.rows:
            view[rec.rows:m] = 0
        rec.gather_s = time.perf_counter() - t0
        if self.staging_kind == "jax_pinned":
            out = jax.device_put(handle, jax.sharding.SingleDeviceSharding(self.device, memory_kind="device"))
        elif self.staging_kind == "torch":
            x = jax.dlpack.from_dlpack(handle)
            out = jax.device_put(x, jax.sharding.SingleDeviceSharding(self.device, memory_kind="device"))
            out = out.reshape(m, self.store.row_elems)
        else:
            out = jnp.array(view, copy=True)
        out.block_until_ready()
        rec.copy_s = time.perf_counter() - t0
        return out, rec

    def submit(self, layer: int, rows: np.ndarray) -> cf.Future:
        if self.closed:
            raise RuntimeError("fetcher is closed")
        return self._prefetch.submit(self.fetch, layer, rows)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._prefetch.shutdown(wait=True, cancel_futures=True)
            self._gather_pool.shutdown(wait=True, cancel_futures=True)

"""Per step and per layer counters of the offload engine."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass
class LayerStats:
    layer: int
    hits: int = 0  # selected blocks already in a cache slot
    tail_hits: int = 0  # selected blocks in the two device-written tail slots
    misses: int = 0  # selected blocks copied from the host
    bytes: int = 0  # bytes moved host -> device
    gather_s: float = 0.0
    copy_s: float = 0.0  # gather + transfer, until the data is on the device
    wait_s: float = 0.0  # time the compute (main) thread waited for this layer's copy


@dataclasses.dataclass
class StepStats:
    step: int
    kind: str  # "prefill" or "decode"
    seconds: float = 0.0  # until the step's output is ready; NaN for a step dispatched with block=False
    dispatch_s: float = 0.0  # host time to enqueue the step (a pipelined loop hides it only if it is < the GPU step)
    layers: list[LayerStats] = dataclasses.field(default_factory=list)
    # fused engine: (device counts [L, 3], bytes per block, None), or ([N, L, 3], bytes per block, this step's row)
    # for a multi-step program's steps (they share the array: one device->host copy), read on first use
    pending: Any = None

    def resolve(self) -> "StepStats":
        if self.pending is not None:
            import numpy as np

            counts, row_bytes, row = self.pending
            self.pending = None
            counts = np.asarray(counts) if row is None else np.asarray(counts)[row]
            self.layers = [LayerStats(i, hits=int(h), tail_hits=int(t), misses=int(m), bytes=int(m) * row_bytes)
                           for i, (h, t, m) in enumerate(counts)]
        return self

    def total(self, name: str) -> float:
        return sum(getattr(s, name) for s in self.resolve().layers)

    @property
    def hit_rate(self) -> float:
        """Fraction of non-tail selected blocks that were already resident."""
        h, m = self.total("hits"), self.total("misses")
        return h / (h + m) if h + m else 1.0

    def summary(self) -> dict:
        # None (JSON null), not NaN, for a pipelined step: its end was never waited for
        seconds = None if math.isnan(self.seconds) else self.seconds
        return {"step": self.step, "kind": self.kind, "seconds": seconds,
                "dispatch_s": self.dispatch_s, "hits": int(self.total("hits")),
                "tail_hits": int(self.total("tail_hits")), "misses": int(self.total("misses")),
                "bytes": int(self.total("bytes")), "copy_s": self.total("copy_s"), "wait_s": self.total("wait_s"),
                "hit_rate": self.hit_rate}


def program_steps(first_step: int, count: int, dispatch_s: float, counts: Any = None,
                  row_bytes: int = 0) -> list[StepStats]:
    """The stats of one multi-step program's `count` decode steps: its host time spread over them (dispatch_s
    each), no wall time of their own (NaN: the program is waited for as a whole); with counts ([N, L, 3] on the
    device, fused engine) step i reads row i of it on first use."""
    return [StepStats(first_step + i, "decode", float("nan"), dispatch_s=dispatch_s,
                      pending=None if counts is None else (counts, row_bytes, i)) for i in range(count)]

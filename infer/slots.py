"""The GPU slot pool's bookkeeping, on the host: which block sits in which slot, and which blocks must move.

Per layer and (sequence b, KV head g) the pool has `cache_slots` slots for blocks fetched from the host plus two
tail slots that hold the two newest blocks (the current partial block and the one before it), which decode writes
on the device. A selection is diffed against the map: resident blocks are hits, the others misses that take the
least recently used slot not needed by this step (free slots first). `cache_slots == top_k` is the paper's pool;
more slots make a block cache.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Plan:
    slot_ids: np.ndarray  # [B, KV, k] int32 pool slot per selected block, -1 = none
    slot_lengths: np.ndarray  # [B, KV, k] int32 valid tokens of each
    miss_b: np.ndarray  # [M] sequence of each missed block
    miss_kv: np.ndarray  # [M] KV head
    miss_block: np.ndarray  # [M] block id
    miss_slot: np.ndarray  # [M] destination slot
    hits: int
    tail_hits: int

    @property
    def misses(self) -> int:
        return int(self.miss_block.shape[0])


class SlotMap:
    def __init__(self, batch: int, kv_heads: int, num_blocks: int, cache_slots: int, block_size: int):
        self.batch, self.kv_heads, self.cache_slots, self.block_size = batch, kv_heads, cache_slots, block_size
        self.block_slot = np.full((batch, kv_heads, num_blocks), -1, np.int32)
        self.slot_block = np.full((batch, kv_heads, cache_slots), -1, np.int32)
        self.last_used = np.full((batch, kv_heads, cache_slots), -1, np.int64)
        self.clock = 0

    def reset(self) -> None:
        self.block_slot.fill(-1)
        self.slot_block.fill(-1)
        self.last_used.fill(-1)

    def plan(self, ids: np.ndarray, positions: np.ndarray) -> Plan:
        """ids: [B, KV, k] selected blocks (-1 = none) for tokens at `positions` [B]; updates the map."""
        self.clock += 1
        s = self.block_size
        bsz, kvh, _ = ids.shape
        cur = (positions // s).astype(np.int64)[:, None, None]
        valid = ids >= 0
        tail = valid & (ids >= cur - 1)
        need = valid & ~tail
        safe = np.where(need, ids, 0)
        b_idx = np.arange(bsz)[:, None, None]
        g_idx = np.arange(kvh)[None, :, None]
        slot = np.where(need, self.block_slot[b_idx, g_idx, safe], -1)
        hit = need & (slot >= 0)
        miss = need & (slot < 0)
        # Hits are used now: LRU order puts them last, so this step's evictions never take them.
        hb, hg, _ = np.nonzero(hit)
        self.last_used[hb, hg, slot[hit]] = self.clock
        mb, mg, mj = np.nonzero(miss)
        if mb.size:
            rank = np.cumsum(miss, axis=-1) - 1  # order of each miss within its (b, g) row
            order = np.argsort(self.last_used, axis=-1, kind="stable")  # free (-1) first, then least recent
            new_slot = order[mb, mg, rank[mb, mg, mj]]
            new_block = ids[mb, mg, mj]
            old_block = self.slot_block[mb, mg, new_slot]
            evicted = old_block >= 0
            self.block_slot[mb[evicted], mg[evicted], old_block[evicted]] = -1
            self.block_slot[mb, mg, new_block] = new_slot
            self.slot_block[mb, mg, new_slot] = new_block
            self.last_used[mb, mg, new_slot] = self.clock
            slot[mb, mg, mj] = new_slot
        else:
            new_slot = new_block = np.zeros((0,), np.int64)
        slot = np.where(tail, self.cache_slots + ids % 2, slot)
        kv_len = (positions + 1).astype(np.int64)[:, None, None]
        lengths = np.where(valid, np.clip(kv_len - ids.astype(np.int64) * s, 0, s), 0)
        return Plan(slot.astype(np.int32), lengths.astype(np.int32), mb, mg, new_block.astype(np.int64),
                    new_slot.astype(np.int64), int(hit.sum()), int(tail.sum()))

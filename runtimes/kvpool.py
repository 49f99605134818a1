"""Host-owned KV buffers for many sequences: one row per live sequence, rows kept contiguous.

Every buffer has the live sequences as its leading axis and the positions as its second-last
axis: ``[rows, *mid, capacity, head_dim]`` (mid = kv heads, or repeats and kv heads). A batched
call over sequences whose rows form a contiguous run binds plain views of the buffers, with no
copy; freeing a sequence moves the last live row into its place (one row copied), so the live
rows are always ``0 .. live - 1``. Capacity grows in chunks for everyone at once (attention
scans the capacity, so it stays close to the longest sequence).
"""

from __future__ import annotations

import weakref

import numpy as np

from edgeloop.errors import EdgeloopError


class Slot:
    """A sequence's row in a pool (the row changes when the pool compacts)."""

    __slots__ = ("row", "__weakref__")

    def __init__(self, row: int):
        self.row = row


class KVPool:
    def __init__(self, shapes: dict[str, tuple[int, ...]], *, head_dim: int, dtype, chunk: int, max_context: int,
                 masks: dict[str, tuple[int, ...]] | None = None):
        """shapes: buffer name -> its mid dims (between the row axis and the capacity axis); masks: boolean
        buffers [rows, *mid, capacity] (which positions hold something)."""
        self.masks = dict(masks or {})
        self.shapes, self.head_dim, self.dtype = {**shapes, **self.masks}, head_dim, np.dtype(dtype)
        self.chunk, self.max_context = chunk, max_context
        self.rows = 0  # rows allocated
        self.capacity = 0
        self.slots: list[Slot] = []  # live sequences, by row
        self.arrays = {name: self._alloc(name, 0, 0) for name in self.shapes}
        self.generation = 0  # bumped whenever the arrays are reallocated (bindings must be rebuilt)

    def _alloc(self, name: str, rows: int, capacity: int) -> np.ndarray:
        if name in self.masks:
            return np.zeros((rows, *self.masks[name], capacity), dtype=bool)
        return np.zeros((rows, *self.shapes[name], capacity, self.head_dim), dtype=self.dtype)

    @property
    def live(self) -> int:
        return len(self.slots)

    def acquire(self, owner) -> Slot:
        if self.live == self.rows:
            self._resize(max(1, self.rows * 2), self.capacity)
        slot = Slot(self.live)
        self.slots.append(slot)
        weakref.finalize(owner, self._release_slot, weakref.ref(slot))
        return slot

    def release(self, slot: Slot) -> None:
        self._release_slot(weakref.ref(slot))

    def _release_slot(self, ref) -> None:
        slot = ref()
        if slot is None or slot.row < 0 or slot.row >= self.live or self.slots[slot.row] is not slot:
            return
        last = self.slots[-1]
        freed = last.row
        if last is not slot:  # the last live row moves into the hole
            for arr in self.arrays.values():
                arr[slot.row] = arr[last.row]
            self.slots[slot.row] = last
            last.row = slot.row
        for name in self.masks:  # a row handed out again starts empty
            self.arrays[name][freed] = False
        self.slots.pop()
        slot.row = -1

    def reserve(self, positions: int) -> None:
        """Room for `positions` tokens in every row."""
        if positions <= self.capacity:
            return
        if positions > self.max_context:
            raise EdgeloopError(f"{positions} tokens exceed the model context of {self.max_context}")
        capacity = min(-(-positions // self.chunk) * self.chunk, self.max_context)
        self._resize(self.rows, capacity)

    def _resize(self, rows: int, capacity: int) -> None:
        keep_rows, keep_cap = min(rows, self.rows), min(capacity, self.capacity)
        for name, old in self.arrays.items():
            new = self._alloc(name, rows, capacity)
            if name in self.masks:
                new[:keep_rows, ..., :keep_cap] = old[:keep_rows, ..., :keep_cap]
            else:
                new[:keep_rows, ..., :keep_cap, :] = old[:keep_rows, ..., :keep_cap, :]
            self.arrays[name] = new
        self.rows, self.capacity = rows, capacity
        self.generation += 1

    def runs(self, rows: list[int]) -> list[tuple[int, int]]:
        """Sorted distinct rows -> maximal contiguous (start, count) runs."""
        out: list[tuple[int, int]] = []
        for r in rows:
            if out and out[-1][0] + out[-1][1] == r:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((r, 1))
        return out

"""The global training order and a position in it that does not depend on the world size.

Position p of the infinite order is item `permute(p % n, n, seed, p // n)` of epoch `p // n`: each epoch is a
permutation of the n items (sequences, or UniRef50 clusters) computed one position at a time by a keyed Feistel
network, so no rank ever holds a whole permutation and every choice is a pure function of (seed, epoch, position).

Reading is split into T = world_size x loader workers *streams*. Stream t reads the t-th, (t+T)-th, (t+2T)-th ...
position of the order that is still unconsumed at or after `frontier`; its state is one cursor. `DataPosition` is
that state for all streams together: it is what a checkpoint stores, globally, instead of per-rank loader state.
Resuming with the same layout continues every stream where it stopped (bitwise as if never interrupted). Resuming
with another layout first collapses the state into "every position below the new frontier, plus a short list of
positions beyond it, is consumed" and starts fresh streams over what is left, so no sample is skipped or repeated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recipe.data import mlm

_ROUNDS = 6


def permute(index: np.ndarray, n: int, seed: int, epoch: int | np.ndarray) -> np.ndarray:
    """Positions `index` (< n) of epoch `epoch`'s permutation of range(n): a balanced Feistel network over the next
    power of four >= n, walked until the value lands below n (a bijection of range(n); under 4 steps on average)."""
    index = np.asarray(index, dtype=np.uint64)
    if n <= 1:
        return np.zeros(index.shape, dtype=np.int64)
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    epoch = np.broadcast_to(np.asarray(epoch, dtype=np.uint64), index.shape)
    keys = [mlm.sample_keys(seed, epoch, r, mlm.SHUFFLE) for r in range(_ROUNDS)]
    out = index.copy()
    todo = np.arange(len(out))
    x = out
    while len(todo):
        x = _feistel(x, [k[todo] for k in keys], half, mask)
        out[todo] = x
        outside = x >= np.uint64(n)
        todo, x = todo[outside], x[outside]
    return out.astype(np.int64)


def _feistel(x: np.ndarray, keys: list[np.ndarray], half: int, mask: np.uint64) -> np.ndarray:
    shift = np.uint64(half)
    left, right = x >> shift, x & mask
    with np.errstate(over="ignore"):
        for key in keys:
            left, right = right, left ^ (mlm._mix(key ^ (right * mlm._M1)) & mask)
    return (left << shift) | right


@dataclass
class DataPosition:
    """How far training has read the global order (see the module docstring). `skip` is sorted, all >= frontier."""

    frontier: int = 0
    skip: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    world_size: int = 0  # layout of the streams the cursors belong to (0: none started)
    workers: int = 0
    cursors: list[int] = field(default_factory=list)  # per stream t = rank + world_size * worker
    next_worker: list[int] = field(default_factory=list)  # per rank: the worker whose batch its loader yields next

    @property
    def streams(self) -> int:
        return self.world_size * self.workers

    def to_dict(self) -> dict:
        return {
            "frontier": int(self.frontier),
            "skip": [int(x) for x in self.skip],
            "world_size": self.world_size,
            "workers": self.workers,
            "cursors": [int(c) for c in self.cursors],
            "next_worker": [int(w) for w in self.next_worker],
        }

    @classmethod
    def from_dict(cls, d: dict) -> DataPosition:
        return cls(
            int(d["frontier"]),
            np.asarray(d["skip"], dtype=np.int64),
            int(d["world_size"]),
            int(d["workers"]),
            [int(c) for c in d["cursors"]],
            [int(w) for w in d["next_worker"]],
        )

    def positions(self, k: np.ndarray) -> np.ndarray:
        """Global positions of the k-th unconsumed positions at or after the frontier (k: array of counts)."""
        k = np.asarray(k, dtype=np.int64)
        if len(self.skip) == 0:
            return self.frontier + k
        free_before = self.skip - self.frontier - np.arange(len(self.skip))  # free slots before each skipped one
        return self.frontier + k + np.searchsorted(free_before, k, side="right")

    def stream_positions(self, stream: int, start: int, count: int) -> np.ndarray:
        """Positions `start .. start+count-1` of stream `stream`."""
        return self.positions(stream + self.streams * np.arange(start, start + count, dtype=np.int64))

    def consumed_count(self) -> int:
        """How many positions have been consumed in all (the samples trained on, globally)."""
        return int(self.frontier + len(self.skip) + sum(self.cursors))

    def consumed(self) -> np.ndarray:
        """Every consumed position, sorted (for tests and audits: it is as long as the run)."""
        parts = [np.arange(self.frontier, dtype=np.int64), self.skip]
        parts += [self.stream_positions(t, 0, c) for t, c in enumerate(self.cursors)]
        return np.sort(np.concatenate(parts))

    def for_layout(self, world_size: int, workers: int) -> DataPosition:
        """This position for streams of another layout: itself when the layout is the same, else collapsed onto a
        new frontier plus the positions beyond it that some stream has already read."""
        if (world_size, workers) == (self.world_size, self.workers):
            return self
        fresh: dict[str, Any] = {
            "world_size": world_size,
            "workers": workers,
            "cursors": [0] * (world_size * workers),
            "next_worker": [0] * world_size,
        }
        if not self.cursors:
            return DataPosition(self.frontier, self.skip, **fresh)
        T = self.streams
        first_free = min(t + T * c for t, c in enumerate(self.cursors))  # in unconsumed-slot numbering
        slots = [
            t + T * np.arange(-(-(first_free - t) // T) if first_free > t else 0, c, dtype=np.int64)
            for t, c in enumerate(self.cursors)
        ]
        ahead = self.positions(np.concatenate(slots)) if slots else np.zeros(0, np.int64)
        frontier = int(self.positions(np.array([first_free]))[0])
        skip = np.union1d(self.skip[self.skip >= frontier], ahead).astype(np.int64)
        return DataPosition(frontier, skip, **fresh)

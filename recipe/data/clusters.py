"""ESM-2's cluster sampling index: UniRef50 cluster -> UniRef90 clusters in it -> their member sequences.

The index is three integer arrays, each with a trailing sentinel, so it can live in memory (built from per-row
cluster ids) or be memory-mapped from a prepared store (recipe/data/store.py) without being read:
  order      rows sorted by (UniRef50, UniRef90) cluster
  sub_start  [n90 + 1] where each UniRef90 group starts in `order` (last entry: len(order))
  first_sub  [n50 + 1] the first UniRef90 group of each UniRef50 cluster (last entry: n90)
"""

from __future__ import annotations

import numpy as np

from recipe.data import mlm


def group_index(c50: np.ndarray, c90: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, sub_start, first_sub) from per-row cluster keys (any integer dtype; equal key = same cluster)."""
    order = np.lexsort((c90, c50)) if c90 is not None else np.argsort(c50, kind="stable")
    s50 = c50[order]
    new90 = np.ones(len(order), dtype=bool)
    new90[1:] = s50[1:] != s50[:-1]
    if c90 is not None:
        s90 = c90[order]
        new90[1:] |= s90[1:] != s90[:-1]
        del s90
    sub_start = np.flatnonzero(new90)
    del new90
    sub50 = s50[sub_start]
    new50 = np.ones(len(sub50), dtype=bool)
    new50[1:] = sub50[1:] != sub50[:-1]
    first_sub = np.flatnonzero(new50)
    return (
        order.astype(np.int64),
        np.append(sub_start, len(order)).astype(np.int64),
        np.append(first_sub, len(sub_start)).astype(np.int64),
    )


class ClusterIndex:
    """An item is a UniRef50 cluster; a draw picks a UniRef90 cluster inside it uniformly, then a member of that
    UniRef90 cluster uniformly (without ur90 ids: a member of the UniRef50 cluster). Both choices are hashes of
    (seed, epoch, cluster), so they need no state and are the same on every rank and worker."""

    def __init__(self, order: np.ndarray, sub_start: np.ndarray, first_sub: np.ndarray):
        self.order, self.sub_start, self.first_sub = order, sub_start, first_sub

    @classmethod
    def from_ids(cls, c50: np.ndarray, c90: np.ndarray | None = None) -> ClusterIndex:
        return cls(*group_index(c50, c90))

    def __len__(self) -> int:
        return len(self.first_sub) - 1

    @property
    def num_sub(self) -> np.ndarray:
        return np.diff(self.first_sub)

    def rows(self, clusters: np.ndarray, seed: int, epoch) -> np.ndarray:
        """The member row drawn for each cluster in `clusters` in `epoch` (an int, or one per cluster)."""
        clusters = np.asarray(clusters, dtype=np.int64)
        keys = mlm.sample_keys(seed, epoch, clusters, mlm.CLUSTER)
        u1 = mlm.uniform(keys, np.zeros(len(clusters)))
        u2 = mlm.uniform(keys, np.ones(len(clusters)))
        first = np.asarray(self.first_sub[clusters])
        num_sub = np.asarray(self.first_sub[clusters + 1]) - first
        sub = first + (u1 * num_sub).astype(np.int64)
        start = np.asarray(self.sub_start[sub])
        sub_len = np.asarray(self.sub_start[sub + 1]) - start
        return np.asarray(self.order[start + (u2 * sub_len).astype(np.int64)])

"""MLM batches for one data-parallel rank, as a stateful iterable that `StatefulDataLoader` checkpoints.

Epoch e reads a permutation of the items (sequences, or UniRef50 clusters with cluster sampling) that depends only
on (seed, e). Rank r of W takes every W-th item from r; loader worker w of K takes every K-th of those from w. So
the ranks together read every item exactly once per epoch, whatever K is. A batch is emitted when the next
sequence would overflow the token budget; that sequence is not consumed, which makes the whole state two integers
(epoch, cursor) per worker.
"""

from __future__ import annotations

import atexit
import logging
import signal
import weakref
from dataclasses import dataclass

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from recipe.data import mlm
from recipe.data.packing import Sample, collate_bshd, collate_thd
from recipe.data.sources import SequenceStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchSettings:
    max_seq_length: int = 1024  # tokens per sequence, <cls> and <eos> included
    layout: str = "thd"  # thd (packed) or bshd (padded)
    token_micro_batch_size: int = 8192  # THD: token budget per micro-batch
    micro_batch_size: int = 8  # BSHD: sequences per micro-batch
    pad_to_multiple_of: int = 16
    pad_to_fixed: bool = False  # THD: pad every batch to exactly token_micro_batch_size
    # THD: a sequence counts as its length rounded up to this when packing. Context parallelism pads every sequence
    # to a multiple of 2 x cp_size x chunk before splitting it, and the budget must hold what the ranks compute on.
    sequence_multiple: int = 1
    mask_prob: float = 0.15
    seed: int = 0
    # Of the selected tokens: the share replaced by <mask> and the share by a random residue (the rest is kept).
    # ESM-2 trains with 0.8 / 0.1; recipe.evaluate's all-mask protocol uses 1.0 / 0.0.
    mask_token_frac: float = 0.8
    random_token_frac: float = 0.1

    def __post_init__(self) -> None:
        if self.layout not in ("thd", "bshd"):
            raise ValueError(f"dataset.layout={self.layout!r} is not 'thd' or 'bshd'")
        if self.max_seq_length < 3:
            raise ValueError(f"dataset.max_seq_length={self.max_seq_length} leaves no room for a residue")
        longest = sequence_tokens(self, self.max_seq_length)
        if self.layout == "thd" and self.token_micro_batch_size < longest:
            padded = "" if self.sequence_multiple == 1 else f" (padded for context parallelism: {longest})"
            raise ValueError(
                f"dataset.token_micro_batch_size={self.token_micro_batch_size} cannot hold one sequence of "
                f"dataset.max_seq_length={self.max_seq_length}{padded}"
            )
        if self.layout == "thd" and self.pad_to_fixed and self.token_micro_batch_size % self.sequence_multiple:
            raise ValueError(
                f"dataset.pad_to_fixed=true with context parallelism needs dataset.token_micro_batch_size="
                f"{self.token_micro_batch_size} to be a multiple of {self.sequence_multiple} (2 x cp_size x "
                "dataset.pad_to_multiple_of / 2), so that every rank's share is the same fixed size"
            )
        if self.layout == "thd" and self.token_micro_batch_size % max(self.pad_to_multiple_of, 1):
            raise ValueError(
                f"dataset.token_micro_batch_size={self.token_micro_batch_size} must be a multiple of "
                f"dataset.pad_to_multiple_of={self.pad_to_multiple_of}, or padded batches could exceed it"
            )
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"dataset.mask_prob={self.mask_prob} must be in (0, 1)")
        if min(self.mask_token_frac, self.random_token_frac) < 0 or self.mask_token_frac + self.random_token_frac > 1:
            raise ValueError(f"mask_token_frac={self.mask_token_frac} and random_token_frac={self.random_token_frac} must be "
                             "non-negative shares that sum to at most 1")


class ClusterIndex:
    """ESM-2 sampling: an item is a UniRef50 cluster; a draw picks a UniRef90 cluster inside it uniformly, then a
    member of that UniRef90 cluster uniformly (without ur90 ids: a member of the UniRef50 cluster)."""

    def __init__(self, c50: np.ndarray, c90: np.ndarray | None = None):
        order = np.lexsort((c90, c50)) if c90 is not None else np.argsort(c50, kind="stable")
        s50 = c50[order]
        new90 = np.ones(len(order), dtype=bool)
        new90[1:] = s50[1:] != s50[:-1]
        if c90 is not None:
            s90 = c90[order]
            new90[1:] |= s90[1:] != s90[:-1]
        self.order = order
        self.sub_start = np.flatnonzero(new90)  # start of each UniRef90 group in `order`
        self.sub_len = np.diff(np.append(self.sub_start, len(order)))
        sub50 = s50[self.sub_start]
        new50 = np.ones(len(sub50), dtype=bool)
        new50[1:] = sub50[1:] != sub50[:-1]
        self.first_sub = np.flatnonzero(new50)
        self.num_sub = np.diff(np.append(self.first_sub, len(sub50)))

    def __len__(self) -> int:
        return len(self.first_sub)

    def rows(self, clusters: np.ndarray, seed: int, epoch: int) -> np.ndarray:
        keys = mlm.sample_keys(seed, epoch, clusters, mlm.CLUSTER)
        u1 = mlm.uniform(keys, np.zeros(len(clusters)))
        u2 = mlm.uniform(keys, np.ones(len(clusters)))
        sub = self.first_sub[clusters] + (u1 * self.num_sub[clusters]).astype(np.int64)
        return self.order[self.sub_start[sub] + (u2 * self.sub_len[sub]).astype(np.int64)]


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.Generator(np.random.Philox(key=[seed & (2**64 - 1), epoch])).permutation(n)


class MLMBatches(IterableDataset):
    """Infinite shuffled epochs for training (`train=True`), or one deterministic pass for validation."""

    def __init__(
        self,
        store: SequenceStore,
        settings: BatchSettings,
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
        cluster_sampling: bool = False,
    ):
        super().__init__()
        self.store, self.settings, self.rank, self.world_size, self.train = store, settings, rank, world_size, train
        self.clusters = None
        if cluster_sampling:
            if "ur50_id" not in store.clusters:
                raise ValueError(f"dataset.cluster_sampling=true but {store.source} has no ur50_id column")
            self.clusters = ClusterIndex(store.clusters["ur50_id"], store.clusters.get("ur90_id"))
        self.num_items = len(self.clusters) if self.clusters is not None else len(store)
        if self.num_items < world_size:
            raise ValueError(f"{store.source}: {self.num_items} items cannot feed {world_size} data-parallel ranks")
        self.epoch, self.cursor, self.num_workers = 0, 0, None

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "num_items": self.num_items,
            "seed": self.settings.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("world_size", "rank", "num_items", "seed"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"data loader state was saved with {key}={state[key]}, this run has {key}={mine[key]}: "
                    "resuming would not read the data the interrupted run would have read"
                )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._saved_workers = state["num_workers"]

    # -------------------------------------------------------------- iteration
    def _my_items(self, epoch: int, worker: int, num_workers: int) -> np.ndarray:
        items = epoch_permutation(self.num_items, self.settings.seed, epoch) if self.train else np.arange(self.num_items)
        return items[self.rank :: self.world_size][worker::num_workers]

    def _rows(self, items: np.ndarray, epoch: int) -> np.ndarray:
        return items if self.clusters is None else self.clusters.rows(items, self.settings.seed, epoch)

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        saved = getattr(self, "_saved_workers", None)
        if saved is not None and saved != num_workers:
            raise ValueError(
                f"data loader state was saved with {saved} worker shard(s) (dataset.num_workers), this run has "
                f"{num_workers}: resume with the same dataset.num_workers"
            )
        self.num_workers = num_workers
        if not self.train:  # validation: every iteration is a fresh, full pass
            self.epoch, self.cursor = 0, 0
        while True:
            epoch = self.epoch
            rows = self._rows(self._my_items(epoch, worker, num_workers), epoch)
            while self.cursor < len(rows):
                take, tokens = self.cursor, 0
                while take < len(rows) and self._fits(take - self.cursor, tokens, self._tokens(rows[take])):
                    tokens += self._tokens(rows[take])
                    take += 1
                batch = self._make_batch(rows[self.cursor : take], epoch)
                self.cursor = take
                yield batch
            if not self.train:
                return
            self.epoch, self.cursor = epoch + 1, 0

    def _tokens(self, row: int) -> int:
        """Tokens the row takes of the budget after cropping, <cls> and <eos> included (padded for CP)."""
        n = min(int(self.store.offsets[row + 1] - self.store.offsets[row]), self.settings.max_seq_length - 2) + 2
        return sequence_tokens(self.settings, n)

    def _fits(self, count: int, tokens: int, n: int) -> bool:
        return fits(self.settings, count, tokens, n)

    def _make_batch(self, rows: np.ndarray, epoch: int) -> dict:
        return collate(make_samples(self.store, rows, self.settings, epoch if self.train else 0, self.train), self.settings)


def sequence_tokens(s: BatchSettings, n: int) -> int:
    """What a sequence of n tokens takes of the THD budget: n rounded up to `sequence_multiple`."""
    return -(-n // s.sequence_multiple) * s.sequence_multiple


def fits(s: BatchSettings, count: int, tokens: int, n: int) -> bool:
    """Whether a sequence of n tokens joins a batch that holds `count` sequences and `tokens` tokens."""
    return count < s.micro_batch_size if s.layout == "bshd" else tokens + n <= s.token_micro_batch_size


def make_samples(store: SequenceStore, rows: np.ndarray, s: BatchSettings, epoch: int, random_crop: bool) -> list[Sample]:
    return build_samples([store.residues(int(r)) for r in rows], np.asarray(rows), s, epoch, random_crop)


def build_samples(residues: list[np.ndarray], keys: np.ndarray, s: BatchSettings, epoch: int, random_crop: bool) -> list[Sample]:
    """Crop, add <cls>/<eos> and mask sequences (residue ids), the masking vectorised over all of their tokens.
    `keys` are the sample indices that, with (seed, epoch), fix every random choice."""
    max_res = s.max_seq_length - 2
    crop_keys = mlm.sample_keys(s.seed, epoch, keys, mlm.CROP) if random_crop else [None] * len(keys)
    toks = []
    for res, ck in zip(residues, crop_keys):
        start = mlm.crop_start(len(res), max_res, ck)
        toks.append(mlm.add_specials(res[start : start + max_res]))
    lengths = np.array([len(t) for t in toks], dtype=np.int64)
    flat = np.concatenate(toks)
    token_keys = np.repeat(mlm.sample_keys(s.seed, epoch, keys, 0), lengths)
    positions = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    inputs, labels = mlm.mask_tokens(flat, token_keys, positions, s.mask_prob, s.mask_token_frac, s.random_token_frac)
    bounds = np.cumsum(lengths)[:-1]
    return [Sample(int(k), i, lab) for k, i, lab in zip(keys, np.split(inputs, bounds), np.split(labels, bounds))]


def collate(samples: list[Sample], s: BatchSettings) -> dict:
    if s.layout == "bshd":
        return collate_bshd(samples, 8)
    return collate_thd(samples, s.pad_to_multiple_of, s.token_micro_batch_size if s.pad_to_fixed else None)


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore SIGTERM and SIGINT: a signal sent to the whole process group (torchrun's shutdown,
    a scheduler, Ctrl-C in a terminal) is for the trainer, which checkpoints at the next step boundary and then
    shuts its loader down. Killed first, the workers would take the trainer down with them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: IterableDataset, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 4):
    """A `StatefulDataLoader` over already-batched items (batch_size=None), whose state refuses a restore into
    another worker count with a message that says so."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    class MLMLoader(StatefulDataLoader):
        def state_dict(self) -> dict:
            return {"num_workers": num_workers, "rank": dataset.rank, "world_size": dataset.world_size, "loader": super().state_dict()}

        def load_state_dict(self, state: dict) -> None:
            for key, mine in (("world_size", dataset.world_size), ("rank", dataset.rank), ("num_workers", num_workers)):
                if state[key] != mine:
                    raise ValueError(
                        f"data loader state was saved with {key}={state[key]}, this run has {key}={mine}: resuming "
                        "would not read the data the interrupted run would have read (use the same dataset.num_workers "
                        "and number of processes)"
                    )
            super().load_state_dict(state["loader"])

        def shutdown(self) -> None:
            """Stop the worker processes now. They ignore SIGTERM, so this must happen before multiprocessing's
            exit handler, which would terminate() them with a SIGTERM and then wait for them forever."""
            it = getattr(self, "_iterator", None)
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()

    kwargs = {}
    if num_workers > 0:
        kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": False, "worker_init_fn": ignore_stop_signals}
    loader = MLMLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)
    if num_workers > 0:  # runs before multiprocessing's handler (atexit is last in, first out), on every way out
        ref = weakref.ref(loader)
        atexit.register(lambda: ref() is not None and ref().shutdown())
    return loader


"""MLM batches for one data-parallel rank.

Training reads the global order of recipe/data/order.py: epoch after epoch, each a permutation of the items
(sequences, or UniRef50 clusters with cluster sampling) that depends only on (seed, epoch). Loader worker w of rank
r reads stream t = r + W * w, so ranks and workers read disjoint shares and together every item once per epoch. A
batch is emitted when the next sequence would overflow the token budget; that sequence is not consumed. Each batch
carries its stream and the stream's cursor after it: the trainer keeps those as the global `DataPosition` it
checkpoints, which resumes at any world size and worker count.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.util  # registers its exit handler on import: ours, registered later, runs before it
import signal
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from recipe.data import mlm
from recipe.data.clusters import ClusterIndex  # noqa: F401  (re-exported: where callers have always found it)
from recipe.data.order import DataPosition, permute
from recipe.data.packing import Sample, collate_bshd, collate_thd
from recipe.data.sources import SequenceStore
from recipe.data.tokenizer import CLS_ID, EOS_ID

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
        """Only what depends on context parallelism's padding (`sequence_multiple`) and the masking shares: each
        other value is checked where it enters, by the config's rules (recipe/config.py) or recipe.evaluate's
        argument checks."""
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
        if min(self.mask_token_frac, self.random_token_frac) < 0 or self.mask_token_frac + self.random_token_frac > 1:
            raise ValueError(
                f"mask_token_frac={self.mask_token_frac} and random_token_frac={self.random_token_frac} must be "
                "non-negative shares that sum to at most 1"
            )


class MLMBatches(IterableDataset):
    """Infinite training batches in the global order (recipe/data/order.py), or one deterministic pass for
    validation (`train=False`: rank r of W takes rows r, r+W, ...)."""

    def __init__(
        self,
        store: SequenceStore,
        settings: BatchSettings,
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
        cluster_sampling: bool = False,
        position: DataPosition | None = None,
    ):
        super().__init__()
        self.store, self.settings, self.rank, self.world_size, self.train = store, settings, rank, world_size, train
        self.clusters = None
        if cluster_sampling:
            self.clusters = store.cluster_index()
            if self.clusters is None:
                raise ValueError(f"dataset.cluster_sampling=true but {store.source} has no ur50_id column / cluster index")
        self.num_items = len(self.clusters) if self.clusters is not None else len(store)
        if self.num_items < world_size:
            raise ValueError(f"{store.source}: {self.num_items} items cannot feed {world_size} data-parallel ranks")
        self.position = position or DataPosition()

    def layout_position(self, num_workers: int) -> DataPosition:
        """The global position for this run's streams (world size x max(num_workers, 1))."""
        return self.position.for_layout(self.world_size, max(num_workers, 1))

    # -------------------------------------------------------------- iteration
    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if not self.train:
            yield from self._validation_pass(worker, num_workers)
            return
        pos = self.layout_position(num_workers)
        w = (worker + pos.next_worker[self.rank]) % num_workers  # continue the round robin where it stopped
        stream = self.rank + self.world_size * w
        cursor = pos.cursors[stream]
        rows, epochs, tokens = (np.zeros(0, np.int64),) * 3
        fetched = cursor
        while True:
            while not self._enough(tokens):  # the batch must not depend on how far ahead we happen to have read
                r, e, t = self._fetch(pos, stream, fetched, 1024)
                rows, epochs, tokens = np.concatenate([rows, r]), np.concatenate([epochs, e]), np.concatenate([tokens, t])
                fetched += len(r)
            take = self._pack(tokens)
            batch = collate(make_samples(self.store, rows[:take], self.settings, epochs[:take], True), self.settings)
            cursor += take
            batch.update(data_stream=stream, data_cursor=cursor, data_worker=w)
            rows, epochs, tokens = rows[take:], epochs[take:], tokens[take:]
            yield batch

    def _fetch(self, pos: DataPosition, stream: int, start: int, count: int):
        """(rows, epochs, tokens) of the stream's positions start .. start+count-1."""
        p = pos.stream_positions(stream, start, count)
        epochs, items = p // self.num_items, p % self.num_items
        items = permute(items, self.num_items, self.settings.seed, epochs)
        rows = items if self.clusters is None else self.clusters.rows(items, self.settings.seed, epochs)
        return rows, epochs, self._token_counts(rows)

    def _token_counts(self, rows: np.ndarray) -> np.ndarray:
        """Tokens each row takes of the budget after cropping, <cls> and <eos> included (padded for CP)."""
        offsets = self.store.offsets
        lengths = np.asarray(offsets[rows + 1]) - np.asarray(offsets[rows])
        return sequence_tokens(self.settings, np.minimum(lengths, self.settings.max_seq_length - 2) + 2)

    def _enough(self, tokens: np.ndarray) -> bool:
        s = self.settings
        return len(tokens) > s.micro_batch_size if s.layout == "bshd" else int(tokens.sum()) > s.token_micro_batch_size

    def _pack(self, tokens: np.ndarray) -> int:
        """How many of the next rows form one batch: greedy, the row that does not fit is left for the next."""
        s = self.settings
        if s.layout == "bshd":
            return min(s.micro_batch_size, len(tokens))
        return max(1, int(np.searchsorted(np.cumsum(tokens), s.token_micro_batch_size, side="right")))

    def _validation_pass(self, worker: int, num_workers: int):
        rows = np.arange(self.num_items)[self.rank :: self.world_size][worker::num_workers]
        tokens = self._token_counts(rows)
        while len(rows):
            take = self._pack(tokens)
            yield collate(make_samples(self.store, rows[:take], self.settings, 0, False), self.settings)
            rows, tokens = rows[take:], tokens[take:]


def sequence_tokens(s: BatchSettings, n):
    """What a sequence of n tokens (an int or an array) takes of the THD budget: n rounded up to `sequence_multiple`."""
    return -(-n // s.sequence_multiple) * s.sequence_multiple


def fits(s: BatchSettings, count: int, tokens: int, n: int) -> bool:
    """Whether a sequence of n tokens joins a batch that holds `count` sequences and `tokens` tokens."""
    return count < s.micro_batch_size if s.layout == "bshd" else tokens + n <= s.token_micro_batch_size


def make_samples(store: SequenceStore, rows: np.ndarray, s: BatchSettings, epoch, random_crop: bool) -> list[Sample]:
    rows = np.asarray(rows)
    starts, ends = np.asarray(store.offsets[rows]).tolist(), np.asarray(store.offsets[rows + 1]).tolist()
    tokens = store.tokens
    return build_samples([tokens[a:b] for a, b in zip(starts, ends)], rows, s, epoch, random_crop)


def build_samples(residues: list[np.ndarray], keys: np.ndarray, s: BatchSettings, epoch, random_crop: bool) -> list[Sample]:
    """Crop, add <cls>/<eos> and mask sequences (residue ids), vectorised over the batch. `keys` are the sample
    indices that, with (seed, epoch), fix every random choice; `epoch` is one int or one per sample (a batch may
    straddle two epochs)."""
    max_res = s.max_seq_length - 2
    lens = np.fromiter((len(r) for r in residues), dtype=np.int64, count=len(residues))
    kept = np.minimum(lens, max_res)
    crop = np.zeros(len(lens), dtype=np.int64)
    long = lens > max_res
    if random_crop and long.any():  # the window start: what mlm.crop_start gives, for all rows at once
        u = mlm.uniform(mlm.sample_keys(s.seed, epoch, keys, mlm.CROP))
        crop[long] = (u[long] * (lens[long] - max_res + 1)).astype(np.int64)
    lengths = kept + 2
    ends = np.cumsum(lengths)
    begins = ends - lengths
    flat = np.empty(int(ends[-1]), dtype=np.int64)
    inner = np.ones(len(flat), dtype=bool)
    inner[begins] = inner[ends - 1] = False
    flat[begins], flat[ends - 1] = CLS_ID, EOS_ID
    flat[inner] = np.concatenate([r[a : a + k] for r, a, k in zip(residues, crop.tolist(), kept.tolist())])
    token_keys = np.repeat(mlm.sample_keys(s.seed, epoch, keys, 0), lengths)
    positions = np.arange(len(flat)) - np.repeat(begins, lengths)
    inputs, labels = mlm.mask_tokens(flat, token_keys, positions, s.mask_prob, s.mask_token_frac, s.random_token_frac)
    b, e = begins.tolist(), ends.tolist()
    return [Sample(int(k), inputs[x:y], labels[x:y]) for k, x, y in zip(np.asarray(keys).tolist(), b, e)]


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


def make_loader(dataset: Any, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 4):
    """A `StatefulDataLoader` over already-batched items (batch_size=None), whose state refuses a restore into
    another worker count with a message that says so."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    class MLMLoader(StatefulDataLoader):
        def state_dict(self) -> dict:
            return {
                "num_workers": num_workers,
                "rank": dataset.rank,
                "world_size": dataset.world_size,
                "loader": super().state_dict(),
            }

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
        _end_leftover_workers_at_exit()  # registered first, so it runs last: after every graceful shutdown
        ref = weakref.ref(loader)

        def shut_down() -> None:
            live = ref()
            if live is not None:
                live.shutdown()

        atexit.register(shut_down)
    return loader


def _end_leftover_workers_at_exit() -> None:
    """Register, once, an exit handler that kills the daemonic worker processes still alive then. A worker whose
    iterator outlived its loader (or was never shut down) ignores the SIGTERM of multiprocessing's own exit handler,
    which would then wait for it forever; SIGKILL cannot be ignored. Daemonic children die at exit in any case."""
    global _EXIT_HANDLER_REGISTERED
    if _EXIT_HANDLER_REGISTERED:
        return
    _EXIT_HANDLER_REGISTERED = True

    def kill_daemonic_children() -> None:
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()
                child.join(timeout=5)

    atexit.register(kill_daemonic_children)


_EXIT_HANDLER_REGISTERED = False

"""Streaming MLM batches from a Hugging Face `datasets.IterableDataset` (local files or a save_to_disk directory),
for corpora that should not be loaded into memory.

Each data-parallel rank reads its own part (`split_dataset_by_node`), each loader worker its own shards (datasets
does that inside workers). Position in the stream is checkpointed with `IterableDataset.state_dict()`, together with
the sequence that did not fit the last batch and the sample counter that keys the masking, so a resumed run reads
the same stream. One caveat comes from datasets itself: it does not checkpoint a shuffle buffer, so with
`dataset.streaming_shuffle_buffer > 0` a resumed run sees a different order; we say so loudly at resume.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from recipe.data.dataset import BatchSettings, build_samples, collate, fits, sequence_tokens
from recipe.data.sources import DataError, detect_format
from recipe.data.tokenizer import encode_residues

log = logging.getLogger(__name__)


def open_stream(path: str | Path, fmt: str = "auto", split: str = "train"):
    """A local `datasets.IterableDataset`: parquet / csv / json files (a file or a directory of them), or a
    save_to_disk directory (turned into a sharded iterable)."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "hf":
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        return ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds) // 10_000)))
    if fmt not in ("parquet", "csv", "json"):
        raise DataError(f"{path}: streaming reads parquet, csv, json or a datasets directory, not {fmt}")
    files = sorted(str(p) for p in path.rglob(f"*.{fmt}")) if path.is_dir() else [str(path)]
    if not files:
        raise DataError(f"{path}: no .{fmt} files")
    return datasets.load_dataset(fmt, data_files=files, split="train", streaming=True)


class StreamingMLMBatches(IterableDataset):
    def __init__(
        self,
        stream,
        settings: BatchSettings,
        rank: int = 0,
        world_size: int = 1,
        column: str = "sequence",
        shuffle_buffer: int = 0,
        source: str = "the stream",
    ):
        super().__init__()
        from datasets.distributed import split_dataset_by_node

        self.settings, self.rank, self.world_size, self.column, self.source = settings, rank, world_size, column, source
        self.stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
        if shuffle_buffer > 0:
            self.stream = self.stream.shuffle(seed=settings.seed, buffer_size=shuffle_buffer)
        self.shuffle_buffer = shuffle_buffer
        self.epoch, self.count, self.pending = 0, 0, None
        self.skipped_empty = 0

    def state_dict(self) -> dict:
        return {
            "stream": self.stream.state_dict(),
            "epoch": self.epoch,
            "count": self.count,
            "pending": self.pending,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(
                f"stream state was saved by rank {state['rank']} of {state['world_size']}, "
                f"this is rank {self.rank} of {self.world_size}"
            )
        if self.shuffle_buffer:
            log.warning(
                "resuming a shuffled stream: datasets does not checkpoint its shuffle buffer, "
                "so the order differs from the interrupted run"
            )
        self.stream.load_state_dict(state["stream"])
        self.epoch, self.count, self.pending = state["epoch"], state["count"], state["pending"]

    def _sequences(self):
        """(sample key, residue ids) forever, epoch after epoch. Keys are unique per (rank, worker, count).

        An epoch that yields no sequence at all (every row empty, or no rows for this rank and worker) ends in an
        error: looping over it again would wait forever for a first batch."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stride = self.world_size * workers
        while True:
            self.stream.set_epoch(self.epoch)
            rows, used = 0, 0
            for row in self.stream:
                rows += 1
                seq = row[self.column]
                if not seq:
                    self.skipped_empty += 1
                    continue
                key = self.count * stride + self.rank * workers + worker
                self.count += 1
                used += 1
                yield key, encode_residues(seq)
            if not used:
                share = f"rank {self.rank} of {self.world_size}, loader worker {worker} of {workers}"
                raise DataError(
                    f"{self.source}: no sequence to train on in a whole pass ({rows} rows for {share}, "
                    f"{'all with an empty ' + repr(self.column) + ' column' if rows else 'none'})"
                )
            self.epoch += 1

    def __iter__(self):
        s = self.settings
        source = self._sequences()
        while True:
            keys, residues, tokens = [], [], 0
            while True:
                if self.pending is None:
                    key, res = next(source)
                    self.pending = (key, res.tobytes())
                key, raw = self.pending
                n = sequence_tokens(s, min(len(raw), s.max_seq_length - 2) + 2)
                if keys and not fits(s, len(keys), tokens, n):
                    break
                keys.append(key)
                residues.append(np.frombuffer(raw, dtype=np.uint8))
                tokens += n
                self.pending = None
            yield collate(build_samples(residues, np.asarray(keys, dtype=np.int64), s, self.epoch, True), s)

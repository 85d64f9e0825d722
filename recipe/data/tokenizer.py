"""The ESM-2 tokenizer as a 256-entry lookup table: one numpy gather per sequence, no Python loop per residue.

It gives the ids of transformers' `EsmTokenizer` for every protein string made of vocabulary letters (upper case).
We also accept lower case (mapped to upper case) and map any other byte to `<unk>`, one `<unk>` per character so that
positions stay aligned with residues; `EsmTokenizer` would merge a run of unknown characters into one `<unk>`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB: tuple[str, ...] = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>",
)  # fmt: skip
CLS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 32
SPECIAL_IDS = (CLS_ID, PAD_ID, EOS_ID, UNK_ID, 31, MASK_ID)
# The 20 standard amino acids (ids 4..23): what MLM's "random token" replacement draws from.
STANDARD_AA_IDS = np.arange(4, 24, dtype=np.int64)

_LUT = np.full(256, UNK_ID, dtype=np.uint8)
for _id, _tok in enumerate(VOCAB):
    if len(_tok) == 1:
        _LUT[ord(_tok)] = _id
        _LUT[ord(_tok.lower())] = _id
_VALID = _LUT != UNK_ID


def encode_residues(sequence: str | bytes) -> np.ndarray:
    """Token ids of the residues alone (no `<cls>`/`<eos>`), uint8."""
    raw = sequence.encode("ascii", errors="replace") if isinstance(sequence, str) else sequence
    return _LUT[np.frombuffer(raw, dtype=np.uint8)]


def count_invalid(sequence: str | bytes) -> int:
    """How many characters map to `<unk>` (letters outside the vocabulary, digits, '*', ...)."""
    raw = sequence.encode("ascii", errors="replace") if isinstance(sequence, str) else sequence
    return int(len(raw) - _VALID[np.frombuffer(raw, dtype=np.uint8)].sum())


def encode(sequence: str | bytes) -> np.ndarray:
    """`<cls>` + residues + `<eos>`, int64: the ids `EsmTokenizer` gives with its default special tokens."""
    return add_specials(encode_residues(sequence))


def add_specials(residues: np.ndarray) -> np.ndarray:
    """`<cls>` + the residue ids + `<eos>`, int64."""
    out = np.empty(len(residues) + 2, dtype=np.int64)
    out[0], out[-1] = CLS_ID, EOS_ID
    out[1:-1] = residues
    return out


def decode(ids: np.ndarray | list[int]) -> str:
    return "".join(VOCAB[int(i)] if len(VOCAB[int(i)]) == 1 else "" for i in ids)


def write_vocab(directory: str | Path) -> Path:
    """Write `vocab.txt` in the format `EsmTokenizer` reads (one token per line, id = line number)."""
    path = Path(directory) / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return path

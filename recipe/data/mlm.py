"""Counter-based randomness, cropping and MLM masking.

Every random decision is a pure function of (seed, epoch, sample index, position, purpose), computed with a
vectorised SplitMix64 hash. No generator state exists, so a resumed run, a different worker count, or another rank
layout makes exactly the same decision for the same sample: resume is exact by construction.
"""

from __future__ import annotations

import numpy as np

from recipe.data.tokenizer import MASK_ID, SPECIAL_IDS, STANDARD_AA_IDS

IGNORE_INDEX = -100
_NOT_MASKABLE = np.zeros(256, dtype=bool)
_NOT_MASKABLE[list(SPECIAL_IDS)] = True

# purposes: separate streams of the hash
CROP, SELECT, ACTION, RANDOM_TOKEN, SHUFFLE, CLUSTER = range(6)

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def sample_keys(seed: int, epoch: int | np.ndarray, index: np.ndarray | int, purpose: int) -> np.ndarray:
    """One 64-bit key per sample index (`epoch`: one for all, or one per index)."""
    idx = np.asarray(index, dtype=np.uint64)
    with np.errstate(over="ignore"):
        base = _mix(np.array([(seed & (2**64 - 1))], dtype=np.uint64))
        base = _mix(base ^ (np.asarray(epoch, dtype=np.uint64) * _GOLDEN) ^ (np.uint64(purpose) << np.uint64(56)))
        return _mix(base ^ (idx * _M2 + _GOLDEN))


def uniform(keys: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """U[0, 1) per key, or per (key, position) pair."""
    with np.errstate(over="ignore"):
        x = keys if positions is None else keys ^ (np.asarray(positions, dtype=np.uint64) * _GOLDEN)
        return (_mix(x) >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def crop_start(length: int, max_residues: int, key: np.uint64 | None) -> int:
    """Start of the kept window: random in training (key given), 0 in validation (key None)."""
    if length <= max_residues or key is None:
        return 0
    return int(uniform(np.asarray([key], dtype=np.uint64))[0] * (length - max_residues + 1))


def mask_tokens(
    tokens: np.ndarray,
    keys: np.ndarray,
    positions: np.ndarray,
    mask_prob: float = 0.15,
    mask_token_frac: float = 0.8,
    random_token_frac: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT/ESM-2 masking over a packed token array: select mask_prob of maskable tokens; of those 80 % -> <mask>,
    10 % -> a random standard amino acid, 10 % unchanged. `keys[i]` is token i's sample key, `positions[i]` its
    position in the sample. Returns (input_ids, labels) with labels -100 wherever no prediction is asked."""
    maskable = ~_NOT_MASKABLE[tokens]
    selected = maskable & (uniform(sample_key_stream(keys, SELECT), positions) < mask_prob)
    action = uniform(sample_key_stream(keys, ACTION), positions)
    inputs = tokens.copy()
    labels = np.where(selected, tokens, IGNORE_INDEX)
    to_mask = selected & (action < mask_token_frac)
    to_random = selected & (action >= mask_token_frac) & (action < mask_token_frac + random_token_frac)
    inputs[to_mask] = MASK_ID
    if to_random.any():
        r = uniform(sample_key_stream(keys[to_random], RANDOM_TOKEN), positions[to_random])
        inputs[to_random] = STANDARD_AA_IDS[(r * len(STANDARD_AA_IDS)).astype(np.int64)]
    return inputs, labels


def sample_key_stream(keys: np.ndarray, purpose: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return keys ^ (np.uint64(purpose + 1) * _M1)

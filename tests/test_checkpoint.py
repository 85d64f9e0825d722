"""Checkpoint helpers (the full save/resume round trips are in test_train.py)."""

import torch

from recipe.checkpoint import extra_state_from_bytes, extra_state_to_bytes


def test_te_extra_state_travels_as_bytes_including_empty():
    """TE's _extra_state (FP8 scales; empty for a BF16 module) crosses DCP as bytes and comes back unchanged."""
    sd = {"a._extra_state": torch.tensor([1, 2, 250], dtype=torch.uint8), "b._extra_state": torch.empty(0, dtype=torch.uint8),
          "w": torch.ones(2)}
    back = extra_state_from_bytes(extra_state_to_bytes(sd))
    assert all(torch.equal(back[k], v) for k, v in sd.items())

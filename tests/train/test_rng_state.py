"""Per-rank RNG state in checkpoints: restored draws repeat; a checkpoint without it warns."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pixellm.train.checkpoint import load_rng_state, save_rng_state


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_state_round_trip_per_rank(tmp_path: Path) -> None:
    torch.manual_seed(1)
    save_rng_state(tmp_path, rank=1)
    expected = _draws()
    _draws()
    assert load_rng_state(tmp_path, rank=1) is True
    assert _draws() == expected
    assert (tmp_path / "rng" / "rank-1.pt").is_file()
    with pytest.warns(UserWarning, match="no RNG state of rank 0"):
        assert load_rng_state(tmp_path, rank=0) is False

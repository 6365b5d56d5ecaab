"""Participant-level train/validation split (numpy only; shared by every group-level trainer)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def split_participants(paired: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Train/validation split of the paired participants, fixed by the seed.

    At least one validation participant when there are two or more pairs and ``val_fraction`` > 0;
    never all of them.  Returns ``(train, validation)``, each sorted.
    """
    paired = sorted(paired)
    n_val = round(val_fraction * len(paired)) if len(paired) >= 2 else 0
    n_val = min(max(n_val, 1 if len(paired) >= 2 and val_fraction > 0 else 0), len(paired) - 1)
    order = np.random.default_rng(seed).permutation(len(paired))
    val = sorted(paired[i] for i in order[:n_val])
    return [p for p in paired if p not in val], val

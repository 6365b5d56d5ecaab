"""The marker of simulated datasets made for held-out evaluation only (``--physics shifted``).

The simulator writes it; the group level and ``tools/export_rish_features.py`` refuse a dataset
that carries it, so nobody trains on it by mistake. Kept free of numpy so that ``import
bids_dmri_ldm.simulate`` stays cheap and does not initialise BLAS before ``python -m
bids_dmri_ldm.simulate`` has limited its threads (``__main__.py``).
"""
from __future__ import annotations

import json
from pathlib import Path

PRESET_KEY = "SimulationPhysicsPreset"
"""``dataset_description.json`` key holding the preset name (raw dataset and truth derivative)."""

HELD_OUT_PRESETS = ("shifted",)
"""Presets whose datasets are for held-out evaluation only (never for training)."""


def is_shifted_dataset(path: str | Path) -> bool:
    """True when ``path`` belongs to a simulated dataset made with a held-out-only physics preset.

    ``path`` may be the raw dataset root, its ``derivatives/simulation`` folder, or any file or
    folder inside either. The nearest ``dataset_description.json`` at or above ``path`` is read,
    and, for a raw root, also ``derivatives/simulation/dataset_description.json``; either naming a
    preset of :data:`HELD_OUT_PRESETS` under :data:`PRESET_KEY` makes the answer True. Anything
    unreadable counts as not shifted (this marks simulated data; real data carry no such key).
    """
    path = Path(path).resolve()
    folder = path if path.is_dir() else path.parent
    for candidate in (folder, *folder.parents):
        description = candidate / "dataset_description.json"
        if description.is_file():
            files = [description, candidate / "derivatives" / "simulation" / "dataset_description.json"]
            return any(_preset_of(f) in HELD_OUT_PRESETS for f in files)
    return False


def training_refusal(path: str | Path) -> str | None:
    """Why a dataset must not be trained on (one line naming ``path``), or None: the message of
    the group level and ``tools/export_rish_features.py`` for :func:`is_shifted_dataset`."""
    if not is_shifted_dataset(path):
        return None
    return (f"{path} was simulated with a held-out physics preset (--physics shifted, marked in its "
            "dataset_description.json): it is for evaluation only; train on a dataset simulated with the "
            "default physics, or on real pairs")


def _preset_of(description: Path) -> str | None:
    try:
        value = json.loads(description.read_text()).get(PRESET_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None

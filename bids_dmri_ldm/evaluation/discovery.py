"""Finding what to score: predictions (derivative dataset) and 7T truth (raw BIDS dataset).

Kept thin on purpose: these functions only find and pair files; loading and scoring are in
:mod:`bids_dmri_ldm.evaluation.cli` and :mod:`bids_dmri_ldm.evaluation.scoring`.

* Predictions: plain globbing of the derivative dataset for
  ``sub-<label>/[ses-<label>/]dwi/*_desc-7Tlike_dwi.nii[.gz]`` with the ``.bval``/``.bvec``/``.json``
  of the same stem (the naming of docs/outputs.md).
* 7T truth: pybids over the raw dataset (inheritance principle for bval/bvec and sidecars); a run
  counts as 7T when its ``MagneticFieldStrength`` is >= 5 T, or, when that field is missing, when
  its session or acquisition label says ``7T``.
* Simulator ground truth: ``TRUTH_BIDS/derivatives/simulation`` (docs/simulator.md), found by
  :func:`find_simulation_truth`.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..bidsio.entities import parse_entities

LOGGER = logging.getLogger("bids_dmri_ldm.evaluate")

PREDICTION_DESC = "7Tlike"
"""``desc-`` label of the predicted DWI (docs/outputs.md)."""

SEVEN_T_MIN_TESLA = 5.0
"""``MagneticFieldStrength`` (T) from which a run counts as a 7T scan."""

SIMULATION_DERIVATIVE = Path("derivatives") / "simulation"
"""Where the simulator writes its ground truth, relative to the raw dataset root."""



def strip_prefix(label: str, prefix: str = "sub-") -> str:
    """``'sub-01' -> '01'``; labels without the prefix are returned unchanged."""
    label = str(label).strip()
    return label.removeprefix(prefix)


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


@dataclass(frozen=True)
class Prediction:
    """One predicted 7T-like DWI of the derivative dataset."""

    participant: str
    """Label without ``sub-``."""
    dwi: Path
    bval: Path
    bvec: Path
    entities: dict = field(default_factory=dict, hash=False, compare=False)
    metadata: dict = field(default_factory=dict, hash=False, compare=False)
    """The JSON sidecar (empty when there is none)."""

    @property
    def session(self) -> str | None:
        return self.entities.get("ses")

    @property
    def method(self) -> str | None:
        """Translation method recorded in the sidecar, when it records one."""
        for key in ("Method", "method", "TranslationMethod"):
            value = self.metadata.get(key)
            if isinstance(value, str):
                return value
            if isinstance(value, dict) and isinstance(value.get("Name", value.get("name")), str):
                return value.get("Name", value.get("name"))
        return None


def find_predictions(pred_root: Path, participants: Sequence[str] | None = None) -> list[Prediction]:
    """Every ``*_desc-7Tlike_dwi.nii[.gz]`` under ``pred_root/sub-*`` (sorted), with its gradients.

    Parameters
    ----------
    pred_root : Path
        Root of the derivative dataset written by the participant level.
    participants : sequence of str, optional
        Labels (without ``sub-``) to keep; all when None.

    Returns
    -------
    list of Prediction
        Files whose ``.bval``/``.bvec`` are missing are skipped with a warning.
    """
    found: list[Prediction] = []
    keep = None if participants is None else set(participants)
    for pattern in (f"sub-*/dwi/*_desc-{PREDICTION_DESC}_dwi.nii*", f"sub-*/ses-*/dwi/*_desc-{PREDICTION_DESC}_dwi.nii*"):
        for dwi in sorted(Path(pred_root).glob(pattern)):
            if not dwi.name.endswith((".nii", ".nii.gz")):
                continue
            entities = parse_entities(dwi.name)
            label = entities.get("sub")
            if label is None or (keep is not None and label not in keep):
                continue
            stem = dwi.with_name(_stem(dwi))
            bval, bvec, sidecar = (Path(f"{stem}.{ext}") for ext in ("bval", "bvec", "json"))
            if not (bval.is_file() and bvec.is_file()):
                LOGGER.warning("skipping %s: no %s/%s next to it", dwi, bval.name, bvec.name)
                continue
            found.append(Prediction(label, dwi, bval, bvec, entities, _read_json(sidecar)))
    return sorted(found, key=lambda p: str(p.dwi))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True)
class SevenTScan:
    """One 7T DWI run of the truth dataset."""

    participant: str
    dwi: Path
    bval: Path
    bvec: Path
    entities: dict = field(default_factory=dict, hash=False, compare=False)
    field_strength: float | None = None


def _is_seven_tesla(metadata: dict, entities: dict) -> tuple[bool, float | None]:
    value = metadata.get("MagneticFieldStrength")
    try:
        tesla = float(value) if value is not None else None
    except (TypeError, ValueError):
        tesla = None
    if tesla is not None:
        return tesla >= SEVEN_T_MIN_TESLA, tesla
    labels = [str(entities.get(key, "")) for key in ("session", "acquisition")]
    return any(label.upper() == "7T" for label in labels), None


def find_seven_tesla_scans(layout, participants: Sequence[str] | None = None, seven: bool = True
                           ) -> dict[str, list[SevenTScan]]:
    """7T DWI runs of a pybids ``BIDSLayout`` (``seven=False``: the other, 3T, runs), by
    participant label (runs sorted by path).

    Runs without a ``.bval``/``.bvec`` (after inheritance) are skipped with a warning.
    """
    query = {"suffix": "dwi", "extension": [".nii", ".nii.gz"], "return_type": "object"}
    if participants is not None:
        query["subject"] = list(participants)
    scans: dict[str, list[SevenTScan]] = {}
    for bids_file in layout.get(**query):
        entities = bids_file.get_entities()
        is_7t, tesla = _is_seven_tesla(bids_file.get_metadata(), entities)
        if is_7t != seven:
            continue
        bval, bvec = layout.get_bval(bids_file.path), layout.get_bvec(bids_file.path)
        if not bval or not bvec:
            LOGGER.warning("skipping %s run %s: no bval/bvec found", "7T" if seven else "3T", bids_file.path)
            continue
        label = str(entities["subject"])
        scans.setdefault(label, []).append(
            SevenTScan(label, Path(bids_file.path), Path(bval), Path(bvec), dict(entities), tesla)
        )
    return {label: sorted(runs, key=lambda s: str(s.dwi)) for label, runs in sorted(scans.items())}


UNTOUCHED = "untouched 3T"
"""Method name of the reference row that scores each participant's raw 3T scan itself."""


def untouched_scans(layout, participants: Sequence[str]) -> list[Prediction]:
    """Each participant's first 3T run of the truth dataset, as a :class:`Prediction` to score
    unchanged (the row every translation must beat)."""
    found = find_seven_tesla_scans(layout, participants, seven=False)
    return [Prediction(label, scans[0].dwi, scans[0].bval, scans[0].bvec, scans[0].entities,
                       {"Method": UNTOUCHED}) for label, scans in found.items()]


def all_participants(layout) -> list[str]:
    """Every participant label of the truth dataset."""
    return sorted(str(s) for s in layout.get_subjects())


def describe_labels(labels: Iterable[str], limit: int = 8) -> str:
    """``'sub-01, sub-02 (+3 more)'`` or ``'none'``, for one-line messages."""
    labels = sorted(set(labels))
    if not labels:
        return "none"
    shown = ", ".join(f"sub-{label}" for label in labels[:limit])
    return shown + (f" (+{len(labels) - limit} more)" if len(labels) > limit else "")


@dataclass(frozen=True)
class SimulationTruth:
    """Ground truth the simulator wrote for one 7T scan (docs/simulator.md)."""

    rish: Path | None
    """Noiseless b=1000 RISH maps (X, Y, Z, 3): L0, L2, L4."""
    mask: Path | None
    """Brain mask (X, Y, Z), or tissue fractions (X, Y, Z, T) whose sum > 0.5 is brain."""


SIMULATION_RISH = "_model-truth_param-rish_dwimap.nii.gz"
"""Suffix of the simulator's noiseless b=1000 RISH L0/L2/L4 of a scan (docs/simulator.md)."""

SIMULATION_MASK = "_desc-brain_mask.nii.gz"
"""Suffix of the simulator's brain mask of a scan (WM + GM + CSF fraction above 0.5)."""


def find_simulation_truth(truth_root: Path, scan: SevenTScan) -> SimulationTruth | None:
    """The simulator's ground truth of ``scan``, or None when the dataset has none.

    The simulator (``bids_dmri_ldm.simulate``, docs/simulator.md) writes, for a raw scan
    ``sub-01/ses-7T/dwi/sub-01_ses-7T_dwi.nii.gz``, on that scan's grid:
    ``derivatives/simulation/sub-01/ses-7T/dwi/sub-01_ses-7T_model-truth_param-rish_dwimap.nii.gz``
    and ``..._desc-brain_mask.nii.gz``.
    """
    truth_root = Path(truth_root)
    try:
        relative = scan.dwi.parent.relative_to(truth_root)
    except ValueError:
        relative = scan.dwi.parent.resolve().relative_to(truth_root.resolve())
    stem = _stem(scan.dwi)
    stem = stem.removesuffix("_dwi")
    folder = truth_root / SIMULATION_DERIVATIVE / relative
    rish = folder / f"{stem}{SIMULATION_RISH}"
    mask = folder / f"{stem}{SIMULATION_MASK}"
    rish, mask = (rish if rish.is_file() else None), (mask if mask.is_file() else None)
    if rish is None and mask is None:
        return None
    return SimulationTruth(rish, mask)

"""Loading one participant's files and scoring them (the file side of the evaluation).

:func:`prepare_truth` reads a 7T scan, chooses the evaluation mask and computes its maps once;
:func:`score_prediction` reads a predicted DWI, computes its maps on its own grid, brings them into
the 7T grid and scores them with :mod:`.scoring`. Errors are :class:`BadDataError` (exit 65).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..core.display import bounding_box
from ..core.gradients import (
    GradientError,
    check_gradients,
    load_gradients,
    select_shell,
)
from ..core.mask import brain_mask
from ..core.resample import resample_mask
from ..core.signal import mean_b0, sanitize
from ..errors import BadDataError
from . import discovery, scoring
from .report import ScoreRow

LOGGER = logging.getLogger("bids_dmri_ldm.evaluate")

MASK_SOURCES = {
    "simulation": "the simulator's ground-truth brain mask",
    "b0-auto": "the automatic brain mask (core.mask) of the 7T scan's mean b0",
}
"""Values of the ``mask`` column and what they mean."""


@dataclass
class ShellData:
    """The b0 + shell volumes of one DWI."""

    data: np.ndarray  # (X, Y, Z, n_b0 + M) float32
    bvals: np.ndarray  # (n_b0 + M,)
    bvecs: np.ndarray  # (n_b0 + M, 3)
    affine: np.ndarray  # (4, 4)
    n_b0: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[:3])

    @property
    def mean_b0(self) -> np.ndarray:
        return mean_b0(self.data, np.arange(self.n_b0))


def load_shell(
    dwi: Path, bval: Path, bvec: Path, shell: float, tolerance: float, box: tuple[slice, ...] | None = None
) -> ShellData:
    """Read a DWI and keep its b0 and ``shell`` volumes (float32, C order, NaN/Inf set to 0).

    ``box`` (3 slices) reads only that part of the grid; the returned affine is the crop's.

    Raises
    ------
    BadDataError
        Unreadable image, not 4D, or a gradient table that does not fit it.
    """
    try:
        img = nib.load(str(dwi))
        if len(img.shape) != 4:
            raise BadDataError(f"{dwi} is not a 4D DWI (shape {img.shape})")
        bvals, bvecs = load_gradients(bval, bvec)
        clean = check_gradients(bvals, bvecs, img.shape[3])
        selection = select_shell(bvals, clean, shell=shell, tolerance=tolerance)
        raw = img.dataobj[tuple(box) + (slice(None),)] if box is not None else np.asanyarray(img.dataobj)
        data = np.ascontiguousarray(raw[..., selection.index], dtype=np.float32)
        del raw
    except GradientError as err:
        raise BadDataError(f"{dwi.name}: {err}") from None
    except BadDataError:
        raise
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for corrupt files
        raise BadDataError(f"cannot read {dwi}: {err}") from None
    data, n_bad = sanitize(data)
    if n_bad:
        LOGGER.warning("%s: %d voxels with NaN/Inf values set to 0", dwi.name, n_bad)
    index = selection.index
    affine = img.affine.astype(np.float64)
    if box is not None:
        affine = affine @ _translation([b.start for b in box])
    return ShellData(data, selection.bvals[index], clean[index], affine, selection.n_b0)


def _translation(offset) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = offset
    return matrix


def read_grid(dwi: Path) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and spatial shape of an image, from its header only."""
    try:
        img = nib.load(str(dwi))
    except Exception as err:  # noqa: BLE001 - any reading failure is bad data
        raise BadDataError(f"cannot read {dwi}: {err}") from None
    return img.affine.astype(np.float64), tuple(int(n) for n in img.shape[:3])


# --------------------------------------------------------------------------- the 7T truth of one participant
@dataclass
class Truth:
    """Everything scored against, on the 7T grid of one participant."""

    scan: discovery.SevenTScan
    affine: np.ndarray
    shape: tuple[int, int, int]
    mask: np.ndarray  # (X, Y, Z) bool
    mask_source: str  # "simulation" or "b0-auto"
    maps: np.ndarray  # (X, Y, Z, 4): RISH L0, L2, L4, FA of the 7T scan
    noiseless_rish: np.ndarray | None  # (X, Y, Z, 3) simulator ground truth, on the 7T grid


def prepare_truth(
    scan: discovery.SevenTScan, truth_root: Path, mask_choice: str, shell: float, tolerance: float
) -> Truth:
    """Load a 7T scan, choose its mask and compute its maps (and find the noiseless RISH)."""
    seven = load_shell(scan.dwi, scan.bval, scan.bvec, shell, tolerance)
    simulated = discovery.find_simulation_truth(truth_root, scan)
    mask, source = None, ""
    if mask_choice in ("auto", "simulation") and simulated is not None and simulated.mask is not None:
        mask = _image_on_grid(simulated.mask, seven.affine, seven.shape, is_mask=True)
        source = "simulation"
    elif mask_choice == "simulation":
        raise BadDataError(f"--mask simulation: no simulator brain mask for {scan.dwi.name} in {truth_root / discovery.SIMULATION_DERIVATIVE}")
    if mask is None:
        mean_dwi = np.mean(seven.data[..., seven.n_b0 :], axis=-1, dtype=np.float32)
        mask = brain_mask(seven.mean_b0, seven.affine, mean_dwi)
        source = "b0-auto"
    if not mask.any():
        raise BadDataError(f"the brain mask of {scan.dwi.name} is empty")
    box = bounding_box(mask, margin=1, whole_if_empty=False)
    crop = ShellData(np.ascontiguousarray(seven.data[box]), seven.bvals, seven.bvecs, seven.affine, seven.n_b0)
    maps = np.zeros(mask.shape + (len(scoring.MAP_NAMES),), dtype=np.float32)
    maps[box] = _maps(crop, mask[box], shell, tolerance)
    del crop
    noiseless = None
    if simulated is not None and simulated.rish is not None:
        noiseless = _image_on_grid(simulated.rish, seven.affine, seven.shape, is_mask=False)[..., : len(scoring.RISH_NAMES)]
    return Truth(scan, seven.affine, seven.shape, mask, source, maps, noiseless)


def _image_on_grid(path: Path, affine: np.ndarray, shape: tuple[int, int, int], is_mask: bool) -> np.ndarray:
    """Read an image and bring it onto a grid (world space) unless it is already on it."""
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # noqa: BLE001 - any reading failure is bad data
        raise BadDataError(f"cannot read {path}: {err}") from None
    same_grid = tuple(data.shape[:3]) == tuple(shape) and np.allclose(img.affine, affine, atol=1e-4)
    if is_mask:
        data = data > 0.5 if data.ndim == 3 else data.sum(axis=-1) > 0.5  # tissue fractions -> brain
        return data if same_grid else resample_mask(data, img.affine, affine, shape)
    data = np.asarray(data, dtype=np.float32)
    return data if same_grid else scoring.maps_on_grid(data if data.ndim == 4 else data[..., None], img.affine, affine, shape)


def _maps(shell_data: ShellData, mask: np.ndarray, shell: float, tolerance: float) -> np.ndarray:
    try:
        return scoring.diffusion_maps(shell_data.data, shell_data.bvals, shell_data.bvecs, mask, shell, tolerance)
    except GradientError as err:
        raise BadDataError(str(err)) from None


# --------------------------------------------------------------------------- predictions
@dataclass
class PredictionOnTruth:
    """One prediction's maps brought into the 7T grid, and where they are valid."""

    participant: str
    session: str | None
    method: str
    relative_path: str
    maps: np.ndarray  # (X, Y, Z, 4) on the 7T grid
    valid: np.ndarray  # (X, Y, Z) bool: inside the prediction's field of view and signal support


def scored_region(truth: Truth, affine: np.ndarray, shape: tuple[int, int, int], name: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Where a DWI on grid ``(affine, shape)`` must be fitted to be scored against ``truth``.

    Returns ``(in_fov, region)``: the 7T voxels inside the DWI's field of view, and the DWI's
    voxels to fit (the 7T brain mask brought there and dilated, :func:`scoring.fit_region`).
    """
    in_fov = scoring.fov_mask(truth.affine, truth.shape, affine, shape)
    if not (truth.mask & in_fov).any():
        raise BadDataError(f"{name} does not overlap the 7T scan {truth.scan.dwi.name} in world space")
    return in_fov, scoring.fit_region(truth.mask & in_fov, truth.affine, affine, shape)


def maps_on_truth(dwi: ShellData, region: np.ndarray, truth: Truth, shell: float, tolerance: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """RISH/FA maps of a DWI computed on its own grid inside ``region``, resampled into the 7T grid.

    Returns ``(maps (X, Y, Z, 4), support (X, Y, Z) bool)`` on the 7T grid; ``support`` is where
    the DWI has diffusion-weighted signal (the participant level's ``--skull-strip`` writes zeros
    outside its mask).
    """
    has_signal = dwi.data[..., dwi.n_b0 :].max(axis=-1) > 0
    maps = scoring.fill_invalid(_maps(dwi, region, shell, tolerance), region & has_signal)
    maps = scoring.maps_on_grid(maps, dwi.affine, truth.affine, truth.shape)
    return maps, resample_mask(has_signal, dwi.affine, truth.affine, truth.shape)


def prediction_on_truth(
    prediction: discovery.Prediction, truth: Truth, method: str, shell: float, tolerance: float, pred_root: Path
) -> PredictionOnTruth:
    """Maps of one predicted DWI, computed on its own grid and resampled into the 7T grid."""
    affine, shape = read_grid(prediction.dwi)
    in_fov, region = scored_region(truth, affine, shape, prediction.dwi.name)
    box = bounding_box(region, whole_if_empty=False)  # read only the part of the prediction that is scored
    pred = load_shell(prediction.dwi, prediction.bval, prediction.bvec, shell, tolerance, box)
    maps, support = maps_on_truth(pred, region[box], truth, shell, tolerance)
    return PredictionOnTruth(prediction.participant, prediction.session, method,
                             str(prediction.dwi.relative_to(pred_root)), maps, in_fov & support)


def score_participant(truth: Truth, predictions: list[PredictionOnTruth]) -> list[ScoreRow]:
    """Score every prediction of one participant inside one common mask.

    The mask is the 7T brain mask restricted to the voxels where *every* prediction is valid
    (inside its field of view and where it has diffusion-weighted signal), so all methods are
    scored on the same voxels; ``coverage`` = scored voxels / 7T brain-mask voxels.
    """
    mask = truth.mask.copy()
    for item in predictions:
        mask &= item.valid
    if not mask.any():
        names = ", ".join(item.relative_path for item in predictions)
        raise BadDataError(f"no voxel of the 7T brain mask of {truth.scan.dwi.name} is covered by {names}")
    rows = []
    for item in predictions:
        common = {
            "participant": item.participant,
            "session": item.session,
            "method": item.method,
            "mask": truth.mask_source,
            "n_voxels": int(mask.sum()),
            "coverage": float(mask.sum() / truth.mask.sum()),
            "prediction": item.relative_path,
        }
        rows.append(ScoreRow(reference="7T", scores=scoring.score_maps(item.maps, truth.maps, mask), **common))
        if truth.noiseless_rish is not None:
            n = len(scoring.RISH_NAMES)
            scores = scoring.score_maps(item.maps[..., :n], truth.noiseless_rish, mask, scoring.RISH_NAMES)
            rows.append(ScoreRow(reference="noiseless7T", scores=scores, **common))
    return rows

"""Gradient tables: reading, checking and shell selection.

Conventions
-----------
* b-values in s/mm²; a volume is a b0 when ``b <= B0_THRESHOLD`` (50 s/mm², as in the reference
  RISH harmonisation tool).
* bvecs are stored ``(N, 3)`` (one row per volume), in the FSL convention of the ``.bvec`` file:
  the image's voxel axes, x flipped when the affine's determinant is positive. Rows of b0 volumes
  may be zero or NaN; they are set to zero.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from os import PathLike

import numpy as np

from ..errors import BadDataError

B0_THRESHOLD = 50.0
"""b-value (s/mm²) at or below which a volume counts as a b0."""

_UNIT_NORM_TOLERANCE = 0.1
"""Gradient vectors whose norm is off by more than this are refused, not silently rescaled."""

MAX_PLAUSIBLE_BVAL = 100_000.0
"""b-value (s/mm²) above which a ``.bval`` file is taken to be in the wrong unit: diffusion MRI
uses up to ~30 000 s/mm² (ex vivo, preclinical); 1000 written as 1e6 is a ×1000 scaling."""


class GradientError(BadDataError, ValueError):
    """A gradient table is missing, malformed or does not match its image (bad data, 65)."""


def _read_table(path: str | PathLike, what: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            table = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except FileNotFoundError:
        raise GradientError(f"{what} file not found: {path}") from None
    except ValueError as err:
        raise GradientError(f"{what} file {path} is not a table of numbers ({err})") from None
    if table.size == 0:
        raise GradientError(f"{what} file {path} is empty")
    return table


def load_gradients(bval_path: str | PathLike, bvec_path: str | PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read FSL-style ``.bval`` / ``.bvec`` files.

    Returns
    -------
    bvals : ndarray, shape (N,)
        b-values in s/mm².
    bvecs : ndarray, shape (N, 3)
        Gradient directions as written (FSL convention); not yet checked, NaN rows kept.
    """
    bvals = _read_table(bval_path, "bval").ravel()
    bvecs = _read_table(bvec_path, "bvec")
    if bvecs.shape[0] != 3 and bvecs.shape[1] == 3:
        bvecs = bvecs.T  # tolerate the N x 3 layout some tools write
    if bvecs.shape[0] != 3:
        raise GradientError(f"bvec file {bvec_path} must have 3 rows, found shape {bvecs.shape}")
    return bvals, bvecs.T.copy()


def b0_mask(bvals: np.ndarray, b0_threshold: float = B0_THRESHOLD) -> np.ndarray:
    """Boolean mask ``(N,)`` of the b0 volumes (``b <= b0_threshold``)."""
    return np.asarray(bvals) <= b0_threshold


def check_gradients(
    bvals: np.ndarray, bvecs: np.ndarray, n_volumes: int, b0_threshold: float = B0_THRESHOLD
) -> np.ndarray:
    """Check a gradient table against its image and return clean bvecs.

    Parameters
    ----------
    bvals : ndarray, shape (N,)
    bvecs : ndarray, shape (N, 3)
    n_volumes : int
        Number of volumes in the DWI image (its 4th dimension).

    Returns
    -------
    bvecs : ndarray, shape (N, 3)
        Unit vectors for diffusion-weighted volumes, zeros for b0 volumes.

    Raises
    ------
    GradientError
        On a count mismatch, negative or non-finite b-values, or a missing / non-unit direction of a
        diffusion-weighted volume.
    """
    bvals = np.asarray(bvals, dtype=np.float64)
    bvecs = np.asarray(bvecs, dtype=np.float64)
    if bvals.shape[0] != bvecs.shape[0]:
        raise GradientError(f"bval has {bvals.shape[0]} entries but bvec has {bvecs.shape[0]}")
    if bvals.shape[0] != n_volumes:
        raise GradientError(f"the image has {n_volumes} volumes but the gradient table has {bvals.shape[0]}")
    if not np.all(np.isfinite(bvals)) or np.any(bvals < 0):
        raise GradientError("bval contains negative or non-finite values")
    check_bval_scale(bvals, b0_threshold)
    is_b0 = b0_mask(bvals, b0_threshold)
    clean = np.where(is_b0[:, None], 0.0, bvecs)
    dw = ~is_b0
    if not np.all(np.isfinite(clean[dw])):
        raise GradientError("bvec has NaN/Inf directions for diffusion-weighted volumes")
    norms = np.linalg.norm(clean[dw], axis=1)
    if np.any(np.abs(norms - 1.0) > _UNIT_NORM_TOLERANCE):
        worst = int(np.argmax(np.abs(norms - 1.0)))
        volume = int(np.flatnonzero(dw)[worst])
        raise GradientError(f"bvec directions of diffusion-weighted volumes must be unit vectors (volume "
                            f"{volume}, b={bvals[volume]:g} s/mm², has norm {norms[worst]:.3f})")
    clean[dw] /= norms[:, None]
    return clean


def check_bval_scale(bvals: np.ndarray, b0_threshold: float = B0_THRESHOLD) -> None:
    """Refuse b-values in a wrong unit (the ``.bval`` file holds s/mm²).

    Raises
    ------
    GradientError
        b-values above :data:`MAX_PLAUSIBLE_BVAL` (e.g. 1000 written as 1e6: scaled ×1000), or
        every b-value at most ``b0_threshold`` while some differ from 0 (e.g. 1 for 1000: ms/µm²).
    """
    bvals = np.asarray(bvals, dtype=np.float64)
    top = float(bvals.max()) if bvals.size else 0.0
    if top > MAX_PLAUSIBLE_BVAL:
        raise GradientError(
            f"b-values up to {top:g} s/mm² are not plausible (diffusion MRI uses up to ~30000); the .bval "
            f"file seems scaled (by {_scale_hint(top)}): BIDS .bval files hold s/mm², e.g. 1000")
    if 0 < top <= b0_threshold and np.unique(bvals).size > 1:
        raise GradientError(
            f"every b-value is at most {top:g} s/mm², so every volume would be a b0; is the .bval file in "
            "ms/µm² (1 for 1000)? BIDS .bval files hold s/mm², e.g. 1000")


def _scale_hint(top: float) -> str:
    """Power of 1000 that brings ``top`` into the plausible range (as text, e.g. ``1000``)."""
    factor = 1000.0
    while top / factor > MAX_PLAUSIBLE_BVAL:
        factor *= 1000.0
    return f"{factor:g}"


@dataclass(frozen=True)
class ShellSelection:
    """Volumes kept for one shell: the b0s followed by the shell's diffusion-weighted volumes."""

    b0_index: np.ndarray
    """Indices (into the input volumes) of the b0 volumes, shape (n_b0,)."""
    shell_index: np.ndarray
    """Indices of the selected shell's volumes, shape (M,)."""
    shell_bval: float
    """Mean b-value of the selected volumes, s/mm²."""
    bvals: np.ndarray
    """b-values of all input volumes, shape (N,)."""
    bvecs: np.ndarray
    """Clean bvecs of all input volumes, shape (N, 3)."""

    @property
    def index(self) -> np.ndarray:
        """b0 indices then shell indices: the volumes of the output image, in order."""
        return np.concatenate([self.b0_index, self.shell_index])

    @property
    def bvecs_shell(self) -> np.ndarray:
        """Unit directions of the shell volumes, shape (M, 3)."""
        return self.bvecs[self.shell_index]

    @property
    def n_b0(self) -> int:
        return int(self.b0_index.size)


def select_shell(
    bvals: np.ndarray,
    bvecs: np.ndarray,
    shell: float = 1000.0,
    tolerance: float = 100.0,
    b0_threshold: float = B0_THRESHOLD,
) -> ShellSelection:
    """Select the b0 volumes and the shell within ``tolerance`` of ``shell`` (s/mm²).

    ``bvecs`` must already be clean (:func:`check_gradients`).

    Raises
    ------
    GradientError
        When there is no b0 volume or no volume near the requested shell.
    """
    bvals = np.asarray(bvals, dtype=np.float64)
    is_b0 = b0_mask(bvals, b0_threshold)
    if not is_b0.any():
        raise GradientError(f"no b0 volume (b <= {b0_threshold:g} s/mm²) in the gradient table")
    in_shell = (~is_b0) & (np.abs(bvals - shell) <= tolerance)
    if not in_shell.any():
        found = sorted({int(round(b, -1)) for b in bvals[~is_b0]})
        raise GradientError(
            f"no volume within {tolerance:g} s/mm² of b={shell:g} (b-values found: {found}); "
            "use --shell / --shell-tolerance"
        )
    shell_index = np.flatnonzero(in_shell)
    return ShellSelection(
        b0_index=np.flatnonzero(is_b0),
        shell_index=shell_index,
        shell_bval=float(bvals[shell_index].mean()),
        bvals=bvals,
        bvecs=np.asarray(bvecs, dtype=np.float64),
    )

"""Plain functions behind the participant-level interfaces (files in, files out; no nipype).

Each ``*_step`` function reads its inputs from disk, calls the signal core / the method registry,
and writes its results into ``out_dir`` (NIfTI float32, mm/s units, the input's affine or the
output grid's). The nipype interfaces in :mod:`.dwi` and :mod:`.bids` are thin wrappers around
them, and the group level calls them directly. Intermediate images are uncompressed ``.nii``
(fast in the work directory); images that become derivatives are ``.nii.gz``.

Volume order of the selected data: the b0 volumes first (input order), then the selected shell's
volumes (input order) — :attr:`bids_dmri_ldm.core.gradients.ShellSelection.index`.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ..bids.derivatives import atomic_save_nifti, make_nifti, write_bval_bvec
from ..core.gradients import (
    B0_THRESHOLD,
    GradientError,
    ShellSelection,
    check_gradients,
    load_gradients,
    select_shell,
)
from ..core.mask import brain_mask
from ..core.resample import output_grid, resample, resample_mask
from ..core.sh import RISH_ORDERS, SHModel, rish_features, scale_sh, sh_basis
from ..core.signal import fit_shell_sh, mean_b0, sanitize

LOGGER = logging.getLogger("bids_dmri_ldm.workflow")

# Errors raised by nibabel/gzip/zlib when a .nii.gz is truncated or not what it claims to be.
_READ_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError, ValueError)


class InputDataError(ValueError):
    """An input run cannot be processed as given (bad image, gradients, shell, mask).

    The message is one line saying what is wrong and, where possible, what to do; the workflow
    reports it as the run's failure reason (exit code 65, "data format error").
    """


# ---------------------------------------------------------------------------------------------
# input checks (header + text files only: cheap, done before any work)


@dataclass(frozen=True)
class InputSummary:
    """What a header-only check learned about a run."""

    shape: tuple[int, ...]
    affine: np.ndarray
    voxel_size: tuple[float, float, float]
    selection: ShellSelection


def check_run_inputs(dwi_file: str | os.PathLike, bval_file: str | os.PathLike | None,
                     bvec_file: str | os.PathLike | None, shell: float, tolerance: float,
                     sh_order_max: int = 4) -> InputSummary:
    """Check a DWI run from its header and gradient files, without reading the voxel data.

    Raises
    ------
    InputDataError
        Missing/empty/mismatched bval or bvec, not a 4D image, unreadable header, no b0, no
        volume near ``shell``, or too few directions for ``sh_order_max``.
    """
    name = Path(dwi_file).name
    if bval_file is None or bvec_file is None:
        missing = ".bval" if bval_file is None else ".bvec"
        raise InputDataError(f"{name}: no {missing} file found (next to the image or inherited from a parent folder)")
    try:
        img = nib.load(str(dwi_file))
        shape = tuple(int(s) for s in img.shape)
    except _READ_ERRORS as err:
        raise InputDataError(f"{name}: cannot read the NIfTI header ({_short(err)})") from None
    if len(shape) != 4 or shape[3] < 2:
        raise InputDataError(f"{name}: a DWI run must be a 4D image (X, Y, Z, volumes); found shape {shape}")
    try:
        bvals, bvecs = load_gradients(bval_file, bvec_file)
        clean = check_gradients(bvals, bvecs, shape[3])
        selection = select_shell(clean_bvals(bvals), clean, shell, tolerance)
    except GradientError as err:
        raise InputDataError(f"{name}: {err}") from None
    needed = {2: 6, 4: 15, 6: 28, 8: 45}.get(sh_order_max, 0)
    if selection.shell_index.size < needed:
        raise InputDataError(
            f"{name}: the b={selection.shell_bval:.0f} shell has {selection.shell_index.size} directions; "
            f"SH order {sh_order_max} (RISH L0-L{sh_order_max}) needs at least {needed}"
        )
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return InputSummary(shape=shape, affine=img.affine, voxel_size=zooms, selection=selection)


def clean_bvals(bvals: np.ndarray) -> np.ndarray:
    """b-values as float64 (s/mm²)."""
    return np.asarray(bvals, dtype=np.float64)


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{type(err).__name__}: {text}" if not text.startswith(type(err).__name__) else text


# ---------------------------------------------------------------------------------------------
# select shell -> load + sanitize


def select_shell_step(dwi_file: str, bval_file: str | None, bvec_file: str | None, shell: float,
                      tolerance: float, sh_order_max: int, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Check the run and write the gradient table of the kept volumes (b0s, then the shell).

    Returns
    -------
    dict
        ``bval_file``, ``bvec_file`` (FSL, of the kept volumes), ``index`` (list of input volume
        indices, in output order), ``n_b0``, ``shell_bval``.
    """
    summary = check_run_inputs(dwi_file, bval_file, bvec_file, shell, tolerance, sh_order_max)
    sel = summary.selection
    index = sel.index
    out_dir = Path(out_dir)
    bval_out, bvec_out = write_bval_bvec(sel.bvals[index], sel.bvecs[index],
                                         out_dir / "selected.bval", out_dir / "selected.bvec")
    return {"bval_file": str(bval_out), "bvec_file": str(bvec_out), "index": [int(i) for i in index],
            "n_b0": sel.n_b0, "shell_bval": sel.shell_bval}


def read_volumes(dwi_file: str | os.PathLike, index: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Read the volumes ``index`` of a 4D image as float32 ``(X, Y, Z, len(index))``.

    Reads the on-disk dtype once (``get_unscaled``: no float64 copy of the whole series), then
    converts only the kept volumes, applying the scaling slope/intercept.

    Raises
    ------
    InputDataError
        When the data cannot be decompressed or read (corrupt or truncated file).
    """
    name = Path(dwi_file).name
    try:
        img = nib.load(str(dwi_file))
        proxy = img.dataobj
        raw = proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else np.asanyarray(proxy)
        if raw.ndim != 4:
            raise InputDataError(f"{name}: a DWI run must be a 4D image; found shape {raw.shape}")
        data = raw[..., index].astype(np.float32)
        del raw
    except InputDataError:
        raise
    except _READ_ERRORS as err:
        raise InputDataError(f"{name}: cannot read the image data, the file is corrupt or truncated ({_short(err)})") from None
    slope = getattr(proxy, "slope", 1.0)
    inter = getattr(proxy, "inter", 0.0)
    if slope not in (None, 1.0) and np.isfinite(slope):
        data *= np.float32(slope)
    if inter not in (None, 0.0) and np.isfinite(inter):
        data += np.float32(inter)
    return data, img.affine


def load_dwi_step(dwi_file: str, index: list[int], n_b0: int, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read the kept volumes, replace NaN/Inf by 0 and record where they were.

    Returns
    -------
    dict
        ``dwi_file`` (float32 ``.nii``, kept volumes), ``mean_b0_file``, ``bad_voxels_file``
        (uint8, 1 where any kept volume was NaN/Inf), ``n_bad_voxels``.
    """
    data, affine = read_volumes(dwi_file, index)
    bad = ~np.all(np.isfinite(data), axis=-1)
    data, n_bad = sanitize(data)
    if n_bad:
        LOGGER.warning("%s: %d voxel(s) with NaN/Inf values are masked out", Path(dwi_file).name, n_bad)
    out_dir = Path(out_dir)
    files = {
        "dwi_file": _save(data, affine, out_dir / "dwi_selected.nii"),
        "mean_b0_file": _save(mean_b0(data, np.arange(n_b0)), affine, out_dir / "mean_b0.nii"),
        "bad_voxels_file": _save(bad.astype(np.uint8), affine, out_dir / "bad_voxels.nii", np.uint8),
    }
    files["n_bad_voxels"] = int(n_bad)
    return files


# ---------------------------------------------------------------------------------------------
# mask


def brain_mask_step(mean_b0_file: str, bad_voxels_file: str, out_dir: str | os.PathLike,
                    mask_file: str | None = None) -> dict[str, Any]:
    """Brain mask: the given mask (same grid required) or median_otsu on the mean b0; voxels with
    NaN/Inf are removed.

    Returns ``{"mask_file": ..., "n_voxels": ...}`` (uint8 NIfTI on the input grid).
    """
    b0_img = nib.load(mean_b0_file)
    if mask_file:
        mask_img = nib.load(str(mask_file))
        if mask_img.shape[:3] != b0_img.shape[:3] or not np.allclose(mask_img.affine, b0_img.affine, atol=1e-3):
            raise InputDataError(f"{Path(mask_file).name}: the brain mask is not on the DWI grid "
                                 f"(shape {mask_img.shape[:3]} vs {b0_img.shape[:3]})")
        mask = np.asanyarray(mask_img.dataobj) > 0
    else:
        with np.errstate(invalid="ignore", divide="ignore"):  # median_otsu's histogram on tiny volumes
            mask = brain_mask(np.asanyarray(b0_img.dataobj, dtype=np.float32))
    mask &= np.asanyarray(nib.load(bad_voxels_file).dataobj) == 0
    if not mask.any():
        raise InputDataError("the brain mask is empty (no signal in the mean b0?)")
    path = _save(mask.astype(np.uint8), b0_img.affine, Path(out_dir) / "brain_mask.nii", np.uint8)
    return {"mask_file": path, "n_voxels": int(mask.sum())}


# ---------------------------------------------------------------------------------------------
# normalise + SH fit + RISH (Eq. 1)


def _shell_parts(bval_file: str, bvec_file: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bvals, bvecs = load_gradients(bval_file, bvec_file)
    is_b0 = bvals <= B0_THRESHOLD
    return np.flatnonzero(is_b0), np.flatnonzero(~is_b0), bvecs[~is_b0]


def fit_rish_step(dwi_file: str, bval_file: str, bvec_file: str, mask_file: str, sh_order_max: int,
                  out_dir: str | os.PathLike, orders: tuple[int, ...] = RISH_ORDERS) -> dict[str, str]:
    """Normalise (S/S0 in [0, 1]), fit SH (least squares, order ``sh_order_max``) and take RISH.

    Returns
    -------
    dict
        ``s0_file`` (X,Y,Z), ``b0_file`` (X,Y,Z,n_b0), ``sh_file`` (X,Y,Z,K) and ``rish_file``
        (X,Y,Z,len(orders)), float32 ``.nii`` on the input grid.
    """
    b0_index, dwi_index, bvecs_shell = _shell_parts(bval_file, bvec_file)
    img = nib.load(dwi_file)
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    mask = np.asanyarray(nib.load(mask_file).dataobj) > 0
    try:
        model = SHModel(bvecs_shell, sh_order_max=sh_order_max)
    except ValueError as err:
        raise InputDataError(str(err)) from None
    s0, coeffs = fit_shell_sh(data, b0_index, dwi_index, mask, model.fit_matrix)
    rish = rish_features(coeffs, model.l_values, orders)
    out_dir = Path(out_dir)
    return {
        "s0_file": _save(s0, img.affine, out_dir / "s0.nii"),
        "b0_file": _save(data[..., b0_index], img.affine, out_dir / "b0.nii"),
        "sh_file": _save(coeffs, img.affine, out_dir / "sh.nii"),
        "rish_file": _save(rish, img.affine, out_dir / "rish_source.nii"),
    }


# ---------------------------------------------------------------------------------------------
# method -> scale maps (Eq. 2)


def predict_scale_step(rish_file: str, mask_file: str, method: str, model_dir: str | None,
                       options: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Scale maps lambda ``(X, Y, Z, n_orders)`` of the chosen method, and its provenance."""
    from ..methods import load_method  # imported here: loading the ldm pulls torch

    translator = load_method(method, model_dir, options)
    img = nib.load(rish_file)
    rish = np.asanyarray(img.dataobj, dtype=np.float32)
    mask = np.asanyarray(nib.load(mask_file).dataobj) > 0
    prediction = translator.predict_scale_maps(rish, mask, img.affine)
    return {"scale_file": _save(prediction.scale, img.affine, Path(out_dir) / "scale.nii"),
            "provenance": prediction.provenance}


# ---------------------------------------------------------------------------------------------
# resample to the output grid


def resample_step(in_file: str, voxel_size: float | None, out_dir: str | os.PathLike, kind: str = "image",
                  clip_min: float | None = None, out_name: str | None = None) -> str:
    """Resample an image to the isotropic output grid (``voxel_size`` mm; ``None``: unchanged).

    ``kind="image"`` uses cubic B-spline interpolation (volume by volume), ``kind="mask"`` linear
    interpolation thresholded at 0.5. The grid keeps the input's axis directions and field of
    view (:func:`~bids_dmri_ldm.core.resample.output_grid`), so FSL-convention bvecs stay valid.
    """
    img = nib.load(in_file)
    new_affine, new_shape = output_grid(img.affine, img.shape[:3], voxel_size)
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    name = out_name or Path(in_file).name.replace(".nii.gz", ".nii")
    out_path = Path(out_dir) / name
    if kind == "mask":
        mask = resample_mask(data > 0, img.affine, new_affine, new_shape)
        return _save(mask.astype(np.uint8), new_affine, out_path, np.uint8)
    out = resample(data, img.affine, new_affine, new_shape, order=3)
    if clip_min is not None:
        np.maximum(out, np.float32(clip_min), out=out)
    return _save(out, new_affine, out_path)


def grid_changes(affine: np.ndarray, shape: tuple[int, ...], voxel_size: float | None) -> bool:
    """Whether resampling to ``voxel_size`` changes the grid (decides the ``res-`` entity)."""
    new_affine, new_shape = output_grid(affine, shape[:3], voxel_size)
    return tuple(new_shape) != tuple(shape[:3]) or not np.allclose(new_affine, affine, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# scale SH (Eq. 3) and rebuild


def scale_sh_step(sh_file: str, scale_file: str, mask_file: str, sh_order_max: int,
                  out_dir: str | os.PathLike, orders: tuple[int, ...] = RISH_ORDERS) -> dict[str, str]:
    """Apply the scale maps to the SH coefficients (Eq. 3) on the output grid.

    Both RISH maps written are taken (Eq. 1) from coefficients on the output grid — the source
    ones from the resampled coefficients, the predicted ones from the scaled coefficients — so
    that ``RISH_predicted = lambda^2 RISH_source`` holds voxel by voxel (RISH of an interpolated
    field is not the interpolated RISH).

    Returns
    -------
    dict
        ``sh_file`` (scaled coefficients, ``.nii``), and the derivative-ready ``.nii.gz`` images
        ``scale_file`` (lambda inside the mask, 1 outside), ``rish_source_file`` and
        ``rish_predicted_file``, 0 outside the mask.
    """
    img = nib.load(sh_file)
    coeffs = np.asanyarray(img.dataobj, dtype=np.float32)
    mask = np.asanyarray(nib.load(mask_file).dataobj) > 0
    lam = np.asanyarray(nib.load(scale_file).dataobj, dtype=np.float32)
    lam = np.where(mask[..., None], np.maximum(lam, 0.0), np.float32(1.0)).astype(np.float32)
    l_values = sh_basis(np.array([[0.0, 0.0, 1.0]]), sh_order_max)[2]
    coeffs[~mask] = 0.0
    scaled = scale_sh(coeffs, lam, l_values, orders)  # Eq. 3
    rish_source = rish_features(coeffs, l_values, orders)  # Eq. 1
    rish_predicted = rish_features(scaled, l_values, orders)
    out_dir = Path(out_dir)
    return {
        "sh_file": _save(scaled, img.affine, out_dir / "sh_scaled.nii"),
        "scale_file": _save(lam, img.affine, out_dir / "scale_maps.nii.gz"),
        "rish_source_file": _save(rish_source, img.affine, out_dir / "rish_source.nii.gz"),
        "rish_predicted_file": _save(rish_predicted, img.affine, out_dir / "rish_predicted.nii.gz"),
    }


def rebuild_step(s0_file: str, b0_file: str, sh_file: str, mask_file: str, bval_file: str, bvec_file: str,
                 sh_order_max: int, out_dir: str | os.PathLike) -> dict[str, str]:
    """Rebuild the 7T-like DWI: ``S0 * max(sum C_hat Y(g), 0)`` on the source directions, the b0
    volumes put back first (clipped >= 0), all volumes zero outside the mask.

    Returns ``dwi_file`` (``.nii.gz``, float32), ``bval_file``, ``bvec_file`` and ``mask_file``
    (the derivative-ready ``.nii.gz`` mask).
    """
    _, _, bvecs_shell = _shell_parts(bval_file, bvec_file)
    img = nib.load(sh_file)
    coeffs = np.asanyarray(img.dataobj, dtype=np.float32)
    mask = np.asanyarray(nib.load(mask_file).dataobj) > 0
    s0 = np.asanyarray(nib.load(s0_file).dataobj, dtype=np.float32)
    b0 = np.asanyarray(nib.load(b0_file).dataobj, dtype=np.float32)
    if b0.ndim == 3:
        b0 = b0[..., None]
    b0 = np.maximum(b0, 0.0)
    basis = sh_basis(bvecs_shell, sh_order_max)[0]
    dwi = rebuild_dwi_volumes(s0, b0, coeffs, basis, mask)
    out_dir = Path(out_dir)
    bvals, bvecs = load_gradients(bval_file, bvec_file)
    bval_out, bvec_out = write_bval_bvec(bvals, bvecs, out_dir / "dwi_7tlike.bval", out_dir / "dwi_7tlike.bvec")
    return {
        "dwi_file": _save(dwi, img.affine, out_dir / "dwi_7tlike.nii.gz"),
        "bval_file": str(bval_out),
        "bvec_file": str(bvec_out),
        "mask_file": _save(mask.astype(np.uint8), img.affine, out_dir / "brain_mask.nii.gz", np.uint8),
    }


def rebuild_dwi_volumes(s0: np.ndarray, b0: np.ndarray, coeffs: np.ndarray, basis: np.ndarray,
                        mask: np.ndarray) -> np.ndarray:
    """``(X, Y, Z, n_b0 + M)`` float32 rebuilt DWI, zero outside ``mask``."""
    from ..core.signal import rebuild_dwi

    dwi = rebuild_dwi(s0, b0, coeffs, basis, mask)
    dwi[~mask] = 0.0
    return dwi


# ---------------------------------------------------------------------------------------------
# helpers


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype=np.float32) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_nifti(make_nifti(data, affine, dtype), path)
    return str(path)


def write_json(obj: Any, path: str | os.PathLike) -> str:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True))
    return str(path)

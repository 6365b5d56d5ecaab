"""The brain mask of a run (step 3): a given mask on the DWI grid, or the automatic one."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ...core.mask import brain_mask
from ...core.resample import resample_nearest
from ...errors import InputDataError
from ...io.nifti import READ_ERRORS, save_array
from .inputs import short_error

LOGGER = logging.getLogger("bids_dmri_ldm.workflow")


# ---------------------------------------------------------------------------------------------
# mask


def brain_mask_step(mean_b0_file: str, bad_voxels_file: str, out_dir: str | os.PathLike,
                    mask_file: str | None = None, mean_dwi_file: str | None = None) -> dict[str, Any]:
    """Brain mask on the DWI grid: the given mask (:func:`user_mask_on_grid`: resampled when it is
    on another grid) or the automatic one (:func:`~bids_dmri_ldm.core.mask.brain_mask` of the mean
    b0, helped by the mean DW image); voxels with NaN/Inf are removed.

    The mask decides only where the scale maps may differ from 1; the output DWI keeps every voxel.

    Returns
    -------
    dict
        ``mask_file`` (uint8 NIfTI on the DWI grid), ``n_voxels``, ``warnings`` (one-line messages
        about a given mask, also logged).

    Raises
    ------
    InputDataError
        A given mask that cannot be read, is not 3D, is empty, or does not overlap the DWI; or
        an empty mask.
    """
    b0_img = nib.load(mean_b0_file)
    warnings: list[str] = []
    if mask_file:
        mask, warnings = user_mask_on_grid(mask_file, b0_img.affine, tuple(b0_img.shape[:3]))
        for message in warnings:
            LOGGER.warning("%s", message)
    else:
        mean_dwi = np.asanyarray(nib.load(mean_dwi_file).dataobj, dtype=np.float32) if mean_dwi_file else None
        mask = brain_mask(np.asanyarray(b0_img.dataobj, dtype=np.float32), b0_img.affine, mean_dwi)
    mask &= np.asanyarray(nib.load(bad_voxels_file).dataobj) == 0
    if not mask.any():
        raise InputDataError("the brain mask is empty (no signal in the mean b0?)")
    path = save_array(mask.astype(np.uint8), b0_img.affine, Path(out_dir) / "brain_mask.nii", np.uint8)
    return {"mask_file": path, "n_voxels": int(mask.sum()), "warnings": warnings}


def user_mask_on_grid(mask_file: str | os.PathLike, affine: np.ndarray,
                      shape: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    """A given brain mask as bool ``shape`` on the DWI grid, and one-line warnings about it.

    Voxels > 0 are brain (values other than 0 and 1, NaN included, give a warning). A 4D mask
    with a single volume is squeezed. A mask on another grid is resampled through the two affines
    (world space, nearest neighbour; outside its field of view: not brain).

    Raises
    ------
    InputDataError
        Unreadable, not 3D, empty, or with no brain voxel inside the DWI's field of view.
    """
    name = Path(mask_file).name
    try:
        img = nib.load(str(mask_file))
        data = np.asanyarray(img.dataobj)
    except READ_ERRORS as err:
        raise InputDataError(f"{name}: cannot read the brain mask ({short_error(err)})") from None
    if data.ndim > 3 and all(n == 1 for n in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise InputDataError(f"{name}: a brain mask must be a 3D image; found shape {tuple(data.shape)}")
    warnings = []
    values = np.asarray(data, dtype=np.float64)
    finite = np.isfinite(values)
    binary = finite & ((values == 0) | (values == 1))
    if not binary.all():
        shown = values[finite & ~binary]
        what = f"values from {shown.min():g} to {shown.max():g}" if shown.size else "no finite value"
        if not finite.all():
            what += f", {int((~finite).sum())} NaN/Inf"
        warnings.append(f"{name}: the brain mask holds values other than 0 and 1 ({what}); voxels > 0 are "
                        "taken as brain")
    mask = finite & (values > 0)
    if not mask.any():
        raise InputDataError(f"{name}: the brain mask is empty (no voxel > 0)")
    same_grid = tuple(mask.shape) == tuple(shape) and np.allclose(img.affine, affine, atol=1e-3)
    if same_grid:
        return mask, warnings
    try:
        mapping = np.linalg.inv(np.asarray(img.affine, dtype=np.float64)) @ np.asarray(affine, dtype=np.float64)
    except np.linalg.LinAlgError:
        raise InputDataError(f"{name}: the brain mask's affine is singular") from None
    on_grid = resample_nearest(mask, mapping, shape)
    if not on_grid.any():
        overlap = resample_nearest(np.ones(mask.shape, dtype=bool), mapping, shape).any()
        where = "its brain voxels lie outside the DWI's field of view" if overlap else \
            "its grid does not overlap the DWI's field of view in world space"
        raise InputDataError(f"{name}: the brain mask cannot be used: {where} (shape {tuple(mask.shape)} vs "
                             f"{tuple(shape)})")
    LOGGER.info("%s: brain mask resampled onto the DWI grid (nearest neighbour)", name)
    return on_grid, warnings

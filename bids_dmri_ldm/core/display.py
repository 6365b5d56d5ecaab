"""Which voxels the participant report shows (numpy + nibabel orientation; no BIDS, no plots).

Shared by the report (:mod:`bids_dmri_ldm.reports`), which draws these voxels, and by the rebuild
step, which records the output signal there while it writes the 7T-like DWI, so that the report
does not inflate the whole output again (:func:`stored_display_voxels`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np


def bounding_box(mask: np.ndarray, margin: int = 0, whole_if_empty: bool = True) -> tuple[slice, slice, slice]:
    """Bounding box of the non-zero voxels of a 3D mask, padded by ``margin``.

    The one bounding box of the package: the report's crops (:mod:`bids_dmri_ldm.reports`) and
    the scored region of the evaluation (:mod:`bids_dmri_ldm.evaluation`).

    Parameters
    ----------
    mask : ndarray, shape (X, Y, Z)
        Brain mask (any dtype; non-zero = inside).
    margin : int
        Voxels added on each side, clipped to the volume.
    whole_if_empty : bool
        What an empty mask gives: the whole volume (default), or empty slices.

    Returns
    -------
    tuple of slice
        One slice per axis.
    """
    mask = np.asarray(mask) != 0
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D, got shape {mask.shape}")
    if not mask.any():
        return tuple(slice(0, n if whole_if_empty else 0) for n in mask.shape)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + margin + 1, mask.shape[axis])))
    return tuple(box)


def select_slices(mask: np.ndarray, n_per_view: int = 3) -> dict[int, list[int]]:
    """Evenly spaced slice indices through the mask, for each slicing axis.

    The slices sit at the fractions ``(i + 1) / (n + 1)`` of the mask's
    extent along each axis, so they avoid the nearly empty edges.

    Parameters
    ----------
    mask : ndarray, shape (X, Y, Z)
        Brain mask; the whole volume is used when it is empty.
    n_per_view : int
        Number of slices per axis.

    Returns
    -------
    dict
        ``{axis: [index, ...]}`` for axes 0 (sagittal), 1 (coronal), 2 (axial).
    """
    box = bounding_box(mask, margin=0)
    chosen = {}
    for axis, extent in enumerate(box):
        span = extent.stop - extent.start
        fractions = (np.arange(n_per_view) + 1) / (n_per_view + 1)
        idx = extent.start + np.floor(fractions * span).astype(int)
        chosen[axis] = sorted({int(min(i, extent.stop - 1)) for i in idx})
    return chosen


def display_voxels(mask: np.ndarray, slices: Mapping[int, Sequence[int]]) -> np.ndarray:
    """Brain voxels on the displayed slices (bool, same shape as ``mask``)."""
    planes = np.zeros(mask.shape, bool)
    for axis, indices in slices.items():
        index = [slice(None)] * 3
        index[axis] = list(indices)
        planes[tuple(index)] = True
    return planes & mask



def stored_display_voxels(mask: np.ndarray, affine: np.ndarray, n_per_view: int = 3) -> np.ndarray:
    """Voxel indices ``(V, 3)`` in the stored axes of ``mask`` of the voxels the report shows.

    The report reorients images to the closest canonical (RAS) orientation, picks
    :func:`select_slices` of the canonical mask and shows its brain voxels there
    (:func:`display_voxels`); this returns those voxels, in the report's order
    (``np.argwhere`` on the canonical grid), mapped back to the stored grid.
    """
    mask = np.asarray(mask) != 0
    ornt = nib.orientations.io_orientation(affine)
    canonical = nib.orientations.apply_orientation(mask, ornt)
    canonical_affine = affine @ nib.orientations.inv_ornt_aff(ornt, mask.shape)
    ijk = np.argwhere(display_voxels(canonical, select_slices(canonical, n_per_view)))
    transform = np.linalg.inv(affine) @ canonical_affine
    return np.rint(nib.affines.apply_affine(transform, ijk)).astype(int)

"""Bringing RISH volumes to and from the model grid (torch), shared by training and inference.

The brain is cropped to its bounding box plus a margin, then resized to the
model grid (paper: 96^3) with ``torch.nn.functional.interpolate``: 'area'
(box averaging, no aliasing) when every axis shrinks, trilinear otherwise.
Training and inference use exactly these functions, so the networks see the
same kind of volumes in both.

Pairing by position: a 3T scan and its 7T partner are compared voxel by voxel only after the
7T RISH and mask have been brought into the 3T grid through the two affines (world space,
:func:`target_on_source`); both are then cropped with the *3T* brain box
(``to_model_grid(..., box_mask=mask_3t)``), so model-grid voxel ``v`` of both is the same place
in the head whatever the two fields of view and brain masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

from ..core.resample import resample
from .normalise import denormalise
from .orientation import canonical


class RishScan(NamedTuple):
    """RISH features of one scan on its own grid.

    Attributes
    ----------
    rish : (X, Y, Z, n_orders) float32, RISH_l (paper Eq. 1) of the attenuation.
    mask : (X, Y, Z) bool, brain mask.
    affine : (4, 4) float64, voxel -> scanner-world mm.
    """

    rish: np.ndarray
    mask: np.ndarray
    affine: np.ndarray


def canonical_scan(scan: RishScan) -> RishScan:
    """The scan in nibabel's closest canonical (RAS+) voxel order (:mod:`.orientation`)."""
    rish, affine = canonical(np.asarray(scan.rish, np.float32), scan.affine)
    mask, _ = canonical(np.asarray(scan.mask, bool), scan.affine)
    return RishScan(rish, mask, affine)


def target_on_source(target: RishScan, source: RishScan) -> RishScan:
    """The target (7T) RISH and mask resampled onto the source (3T) grid through the affines.

    Both scans are of the same head in one scanner-world space, so voxel ``i`` of the result
    and of ``source`` are the same place.  RISH: trilinear (no overshoot, stays >= 0); mask:
    trilinear of the 0/1 mask, threshold 0.5, and False wherever the source voxel lies outside
    the target's field of view.

    Returns
    -------
    RishScan
        On the source grid (``source.affine``), target values.
    """
    shape = tuple(source.mask.shape[:3])
    rish = resample(np.asarray(target.rish, np.float32), target.affine, source.affine, shape, order=1)
    np.maximum(rish, 0.0, out=rish)
    inside = resample(np.asarray(target.mask, np.float32), target.affine, source.affine, shape,
                      order=1, mode="constant") >= 0.5
    return RishScan(rish, inside, np.asarray(source.affine, np.float64))


@dataclass(frozen=True)
class Crop:
    """Bounding box of the brain in the input grid: ``slices`` and the full ``shape``."""

    slices: tuple[slice, slice, slice]
    shape: tuple[int, int, int]

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.slices)

    def as_list(self) -> list[list[int]]:
        return [[s.start, s.stop] for s in self.slices]


def brain_crop(mask: np.ndarray, margin: int) -> Crop:
    """Bounding box of ``mask`` (X, Y, Z) grown by ``margin`` voxels, clipped to the grid."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise ValueError("the brain mask is empty")
    slices = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        slices.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return Crop(tuple(slices), tuple(mask.shape))


def resize(volumes: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Resize (N, C, X, Y, Z) to (N, C, *shape): area averaging when shrinking, else trilinear."""
    shape = tuple(int(s) for s in shape)
    if tuple(volumes.shape[2:]) == shape:
        return volumes
    if all(s <= v for s, v in zip(shape, volumes.shape[2:])):
        return F.interpolate(volumes, size=shape, mode="area")
    return F.interpolate(volumes, size=shape, mode="trilinear", align_corners=False)


def to_model_grid(normalised: np.ndarray, mask: np.ndarray, grid: tuple[int, int, int],
                  margin: int, box_mask: np.ndarray | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, Crop]:
    """Normalised RISH (X, Y, Z, n) -> single-order batch (n, 1, *grid) on the model grid.

    ``box_mask`` (default ``mask``) decides the crop box: a 7T scan brought onto its 3T
    partner's grid (:func:`target_on_source`) is cropped with the 3T brain's box so that the
    two model-grid volumes are paired voxel by voxel.

    Returns
    -------
    volumes : (n, 1, *grid) float32 tensor, one RISH order per batch entry.
    mask_model : (*grid) bool tensor, brain mask on the model grid (fraction > 0.5).
    crop : the :class:`Crop` needed by :func:`from_model_grid`.
    """
    crop = brain_crop(mask if box_mask is None else box_mask, margin)
    block = np.ascontiguousarray(np.moveaxis(normalised[crop.slices], -1, 0))[:, None]
    volumes = resize(torch.from_numpy(block.astype(np.float32)), grid)
    m = torch.from_numpy(np.asarray(mask, np.float32)[crop.slices])[None, None]
    mask_model = resize(m, grid)[0, 0] > 0.5
    return volumes, mask_model, crop


def from_model_grid(volumes: torch.Tensor, crop: Crop, fill: float) -> np.ndarray:
    """(n, 1, *grid) model-grid volumes -> (X, Y, Z, n) float32 array on the input grid.

    Voxels outside the crop box get ``fill`` (the normalised background).
    """
    out = np.full((*crop.shape, volumes.shape[0]), fill, dtype=np.float32)
    out[crop.slices] = _on_crop_box(volumes, crop)
    return out


def _on_crop_box(volumes: torch.Tensor, crop: Crop) -> np.ndarray:
    """(n, 1, *grid) model-grid volumes resized to the crop box: (*crop_shape, n) float32."""
    return np.moveaxis(resize(volumes.float().cpu(), crop.crop_shape)[:, 0].numpy(), 0, -1)


def denormalised_from_model_grid(volumes: torch.Tensor, crop: Crop, mask: np.ndarray,
                                 norm: dict) -> np.ndarray:
    """RISH (X, Y, Z, n) float32 on the input grid from normalised model-grid volumes (n, 1, *grid):
    ``denormalise(from_model_grid(volumes, crop, background), mask, norm)``, bit for bit, computed
    on the crop box only (zero outside ``mask``, and the brain crop box holds the whole mask),
    without the two input-grid temporaries (~0.1-0.2 s at HCP size)."""
    mask = np.asarray(mask, bool)
    inside = mask[crop.slices]
    if np.count_nonzero(inside) != np.count_nonzero(mask):  # a box that is not the mask's: the long way
        return denormalise(from_model_grid(volumes, crop, norm["background"]), mask, norm)
    out = np.zeros((*crop.shape, volumes.shape[0]), dtype=np.float32)
    out[crop.slices] = denormalise(_on_crop_box(volumes, crop), inside, norm)
    return out

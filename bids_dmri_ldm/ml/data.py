"""Bringing RISH volumes to and from the model grid (torch), shared by training and inference.

The brain is cropped to its bounding box plus a margin, then resized to the
model grid (paper: 96^3) with ``torch.nn.functional.interpolate``: 'area'
(box averaging, no aliasing) when every axis shrinks, trilinear otherwise.
Training and inference use exactly these functions, so the networks see the
same kind of volumes in both.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F


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
                  margin: int) -> tuple[torch.Tensor, torch.Tensor, Crop]:
    """Normalised RISH (X, Y, Z, n) -> single-order batch (n, 1, *grid) on the model grid.

    Returns
    -------
    volumes : (n, 1, *grid) float32 tensor, one RISH order per batch entry.
    mask_model : (*grid) bool tensor, brain mask on the model grid (fraction > 0.5).
    crop : the :class:`Crop` needed by :func:`from_model_grid`.
    """
    crop = brain_crop(mask, margin)
    block = np.ascontiguousarray(np.moveaxis(normalised[crop.slices], -1, 0))[:, None]
    volumes = resize(torch.from_numpy(block.astype(np.float32)), grid)
    m = torch.from_numpy(np.asarray(mask, np.float32)[crop.slices])[None, None]
    mask_model = resize(m, grid)[0, 0] > 0.5
    return volumes, mask_model, crop


def from_model_grid(volumes: torch.Tensor, crop: Crop, fill: float) -> np.ndarray:
    """(n, 1, *grid) model-grid volumes -> (X, Y, Z, n) float32 array on the input grid.

    Voxels outside the crop box get ``fill`` (the normalised background).
    """
    block = resize(volumes.float().cpu(), crop.crop_shape)[:, 0]
    out = np.full((*crop.shape, volumes.shape[0]), fill, dtype=np.float32)
    out[crop.slices] = np.moveaxis(block.numpy(), 0, -1)
    return out

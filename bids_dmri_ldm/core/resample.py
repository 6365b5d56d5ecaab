"""Resampling between voxel grids in world (scanner) space.

An output grid made by :func:`output_grid` keeps the input's axis directions and field of view and
changes only the voxel size, so gradient tables in the FSL (voxel-axis) convention stay valid for it.
Interpolation: cubic B-spline (``scipy.ndimage.map_coordinates``/``affine_transform`` with a
prefilter) for images, linear + threshold 0.5 for masks.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) of an affine, shape (3,)."""
    return np.sqrt(np.sum(np.asarray(affine, dtype=np.float64)[:3, :3] ** 2, axis=0))


def output_grid(affine: np.ndarray, shape: tuple[int, ...], voxel_size: float | None) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Grid of isotropic ``voxel_size`` (mm) covering the same field of view, same axis directions.

    ``voxel_size=None`` returns the input grid unchanged.

    Returns
    -------
    new_affine : ndarray, shape (4, 4)
    new_shape : tuple of 3 ints
    """
    affine = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(s) for s in shape[:3])
    if voxel_size is None:
        return affine.copy(), shape
    if voxel_size <= 0:
        raise ValueError(f"voxel size must be positive, got {voxel_size}")
    zooms = voxel_sizes(affine)
    directions = affine[:3, :3] / zooms
    extent = np.asarray(shape) * zooms
    new_shape = tuple(int(max(1, round(e / voxel_size))) for e in extent)
    new_zooms = np.full(3, float(voxel_size))
    # Align the outer corners of the two grids (voxel centres sit half a voxel inside).
    corner = affine[:3, 3] - directions @ (zooms / 2.0)
    new_affine = np.eye(4)
    new_affine[:3, :3] = directions * new_zooms
    new_affine[:3, 3] = corner + directions @ (new_zooms / 2.0)
    return new_affine, new_shape


def _voxel_map(affine: np.ndarray, new_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Matrix and offset mapping output voxel indices to input voxel indices."""
    mapping = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(new_affine, dtype=np.float64)
    return mapping[:3, :3], mapping[:3, 3]


def resample(
    data: np.ndarray,
    affine: np.ndarray,
    new_affine: np.ndarray,
    new_shape: tuple[int, int, int],
    order: int = 3,
    mode: str = "nearest",
) -> np.ndarray:
    """Resample a 3D ``(X, Y, Z)`` or 4D ``(X, Y, Z, C)`` array onto another grid.

    Cubic B-spline by default; values beyond the field of view repeat the edge (``mode="nearest"``;
    ``"constant"``: 0 there). The last axis of a
    4D array is resampled volume by volume (memory: one output volume at a time beyond the result).

    Returns
    -------
    ndarray, shape ``new_shape`` (+ ``(C,)``), float32
    """
    matrix, offset = _voxel_map(affine, new_affine)
    identity = np.allclose(matrix, np.eye(3)) and np.allclose(offset, 0) and tuple(data.shape[:3]) == tuple(new_shape)
    if identity:
        return np.asarray(data, dtype=np.float32).copy()

    def one(volume: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(
            np.asarray(volume, dtype=np.float32), matrix, offset, output_shape=tuple(new_shape), order=order, mode=mode
        )

    if data.ndim == 3:
        return one(data)
    out = np.empty(tuple(new_shape) + (data.shape[-1],), dtype=np.float32)
    for c in range(data.shape[-1]):
        out[..., c] = one(data[..., c])
    return out


def fill_outside_mask(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Copy of ``data (X, Y, Z[, C])`` whose voxels outside ``mask`` take the value of the nearest
    voxel inside it (Euclidean distance in voxel units).

    Used before interpolating maps that are only defined inside the mask (scale maps), so that the
    interpolation near the mask's edge does not blend them with the values outside. An empty mask
    returns ``data`` unchanged (float32).
    """
    mask = np.asarray(mask, dtype=bool)
    data = np.asarray(data, dtype=np.float32)
    if not mask.any() or mask.all():
        return data.copy()
    index = ndimage.distance_transform_edt(~mask, return_distances=False, return_indices=True)
    return data[tuple(index)]


def resample_mask(mask: np.ndarray, affine: np.ndarray, new_affine: np.ndarray, new_shape: tuple[int, int, int]) -> np.ndarray:
    """Resample a boolean mask (linear interpolation, then threshold at 0.5)."""
    return resample(np.asarray(mask, dtype=np.float32), affine, new_affine, new_shape, order=1) >= 0.5


def resize_to_grid(volume: np.ndarray, shape: tuple[int, int, int], order: int = 1) -> np.ndarray:
    """Resize ``(X, Y, Z[, C])`` to a fixed model grid ``shape`` (index space, corners aligned).

    Used to bring RISH maps onto the model's grid (e.g. 96³) and back.
    """
    volume = np.asarray(volume, dtype=np.float32)
    factors = [n / o for n, o in zip(shape, volume.shape[:3])]
    if volume.ndim == 4:
        factors.append(1.0)
    out = ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True)
    return out.astype(np.float32, copy=False)

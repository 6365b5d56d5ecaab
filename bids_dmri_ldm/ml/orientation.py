"""One canonical voxel orientation for every learned method (nibabel's closest canonical, RAS+).

The networks see arrays in storage order, so the same brain stored LAS, LPS or with two axes
swapped would be, to them, a different image.  Every learned method and the group level bring
each scan into the orientation nibabel's :func:`~nibabel.funcs.as_closest_canonical` would give
(voxel axes as close as possible to R, A, S) before any model sees it, and map results back to
the input's storage order afterwards.  Only axis permutations and flips are involved: the values
are moved, never interpolated, so ``from_canonical(to_canonical(x)) == x`` exactly.

Arrays keep their trailing (non-spatial) axes: ``(X, Y, Z[, C])``.  Affines are 4x4 voxel-to-world
(scanner mm).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

_RAS = axcodes2ornt(("R", "A", "S"))


@dataclass(frozen=True)
class Reorientation:
    """How one grid maps to its canonical (RAS+) version.

    Attributes
    ----------
    transform : ndarray, shape (3, 2)
        nibabel orientation transform (input axes -> canonical axes, with flips).
    shape : tuple of 3 ints
        Spatial shape of the input grid.
    affine : ndarray, shape (4, 4)
        Voxel-to-world affine of the input grid.
    """

    transform: np.ndarray
    shape: tuple[int, int, int]
    affine: np.ndarray

    @classmethod
    def of(cls, affine: np.ndarray, shape: tuple[int, ...]) -> Reorientation:
        """The reorientation of a grid with ``affine`` and spatial ``shape``."""
        affine = np.asarray(affine, dtype=np.float64)
        transform = ornt_transform(io_orientation(affine), _RAS)
        return cls(transform, tuple(int(s) for s in shape[:3]), affine)

    @property
    def is_identity(self) -> bool:
        """True when the input already is in canonical orientation."""
        return bool(np.array_equal(self.transform, _RAS))

    @property
    def canonical_affine(self) -> np.ndarray:
        """Voxel-to-world affine of the canonical grid (the same world points)."""
        return self.affine @ inv_ornt_aff(self.transform, self.shape)

    def to_canonical(self, volume: np.ndarray) -> np.ndarray:
        """``(X, Y, Z[, C])`` in input order -> the same voxels in canonical order."""
        if self.is_identity:
            return volume
        return np.ascontiguousarray(apply_orientation(volume, self.transform))

    def from_canonical(self, volume: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_canonical`."""
        if self.is_identity:
            return volume
        inverse = ornt_transform(_RAS, io_orientation(self.affine))
        return np.ascontiguousarray(apply_orientation(volume, inverse))


def canonical(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(volume, affine)`` of a grid brought to canonical orientation (world points unchanged)."""
    reo = Reorientation.of(affine, np.shape(volume))
    return reo.to_canonical(np.asarray(volume)), reo.canonical_affine

"""Synthetic white-matter bundles along known trajectories, and the fibre populations they give.

Each bundle is an analytic tube (a line segment) or a swept circular arc in template (MNI, mm)
space, with a Gaussian cross-section. At a point ``y`` a bundle has a weight
``w = exp(-d^2 / (2 s^2))`` (``d``: distance to its trajectory, ``s``: its radius) and a unit
tangent; distance and tangent are closed-form, so millions of points cost a few vector operations.

Trajectories (approximate, left/right pairs): corpus callosum (a sheet of left-right arcs
rising to the cortex), corticospinal tracts, superior longitudinal fasciculi, arcuate fasciculi,
cingula, inferior fronto-occipital/longitudinal fasciculi, and the middle cerebellar peduncle.
They cross where real bundles cross: corpus callosum x corticospinal x SLF in the centrum
semiovale (three-way crossings), cingulum over the callosum, arcuate x corticospinal.

White matter not covered by a bundle carries a "background" population pointing radially from
the brain centre (the corona radiata's projection towards the cortex).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CUTOFF_RADII = 4.0
"""Bundle weights are evaluated within this many radii of the trajectory (exp(-8) beyond: 0)."""

MAX_POPULATIONS = 3
"""Fibre populations kept per sub-voxel (the strongest ones)."""

BACKGROUND_CENTRE_MM = np.array([0.0, -18.0, 10.0])
"""Centre from which background fibres point radially (template space)."""


@dataclass(frozen=True)
class Segment:
    """Straight bundle from ``start`` to ``end`` (mm) with Gaussian radius ``radius`` (mm)."""

    name: str
    start: tuple[float, float, float]
    end: tuple[float, float, float]
    radius: float

    def bounding_box(self) -> tuple[np.ndarray, np.ndarray]:
        """Box (lower, upper corners, mm) outside which the weight is below ``exp(-8)``."""
        ends = np.array([self.start, self.end])
        margin = CUTOFF_RADII * self.radius
        return ends.min(axis=0) - margin, ends.max(axis=0) + margin

    def weight_and_tangent(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weight ``(P,)`` and unit tangent ``(P, 3)`` at points ``(P, 3)``."""
        start = np.asarray(self.start, dtype=np.float32)
        axis = np.asarray(self.end, dtype=np.float32) - start
        length = float(np.linalg.norm(axis))
        axis = axis / length
        rel = points - start
        along = np.clip(rel @ axis, 0.0, length)
        dist2 = np.sum((rel - along[:, None] * axis) ** 2, axis=1)
        weight = np.exp(-dist2 / (2.0 * self.radius**2))
        return weight, np.broadcast_to(axis, points.shape)


@dataclass(frozen=True)
class Arc:
    """Bundle along a circular arc, optionally swept into a sheet along the arc plane's normal.

    The arc is ``centre + radius (cos t e1 + sin t e2)`` for ``t`` in ``[t_start, t_end]``
    (degrees), ``e2 = normal x e1``; points within ``half_width`` of the arc plane (along the
    normal) are at in-plane distance only (a sheet), beyond it the distance grows.
    """

    name: str
    centre: tuple[float, float, float]
    normal: tuple[float, float, float]
    e1: tuple[float, float, float]
    arc_radius: float
    t_start: float
    t_end: float
    radius: float
    half_width: float = 0.0

    def bounding_box(self) -> tuple[np.ndarray, np.ndarray]:
        """Box (lower, upper corners, mm) outside which the weight is below ``exp(-8)``."""
        reach = self.arc_radius + self.half_width + CUTOFF_RADII * self.radius
        centre = np.asarray(self.centre, dtype=np.float64)
        return centre - reach, centre + reach

    def weight_and_tangent(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weight ``(P,)`` and unit tangent ``(P, 3)`` at points ``(P, 3)``."""
        normal = np.asarray(self.normal, dtype=np.float32)
        e1 = np.asarray(self.e1, dtype=np.float32)
        e2 = np.cross(normal, e1)
        rel = points - np.asarray(self.centre, dtype=np.float32)
        out_of_plane = rel @ normal
        u, v = rel @ e1, rel @ e2
        angle = np.arctan2(v, u)
        lo, hi = np.radians(self.t_start), np.radians(self.t_end)
        mid = (lo + hi) / 2.0
        angle = mid + (angle - mid + np.pi) % (2.0 * np.pi) - np.pi  # unwrap around the arc middle
        angle = np.clip(angle, lo, hi)
        in_plane2 = (u - self.arc_radius * np.cos(angle)) ** 2 + (v - self.arc_radius * np.sin(angle)) ** 2
        off = np.maximum(np.abs(out_of_plane) - self.half_width, 0.0)
        weight = np.exp(-(in_plane2 + off**2) / (2.0 * self.radius**2))
        tangent = -np.sin(angle)[:, None] * e1 + np.cos(angle)[:, None] * e2
        return weight, tangent.astype(np.float32)


def _pair(make):
    return [make(+1.0, "L"), make(-1.0, "R")]


def default_bundles() -> list[Segment | Arc]:
    """The synthetic bundles in template (MNI152, RAS mm) space."""
    bundles: list[Segment | Arc] = [
        # Corpus callosum: left-right arcs in coronal planes (lowest at the midline, z ~ 18),
        # rising laterally towards the cortex; swept from y = -35 to y = 25.
        Arc("CC", centre=(0.0, -5.0, 88.0), normal=(0.0, 1.0, 0.0), e1=(1.0, 0.0, 0.0), arc_radius=70.0,
            t_start=50.0, t_end=130.0, radius=4.5, half_width=30.0),  # e2 = normal x e1 = -z
        # Middle cerebellar peduncle: from the pons round into both cerebellar hemispheres.
        Arc("MCP", centre=(0.0, -45.0, -34.0), normal=(0.0, 0.0, 1.0), e1=(1.0, 0.0, 0.0), arc_radius=22.0,
            t_start=0.0, t_end=180.0, radius=5.0),
    ]
    bundles += _pair(lambda s, h: Segment(f"CST{h}", start=(s * 10.0, -22.0, -38.0), end=(s * 32.0, -22.0, 62.0), radius=5.0))
    bundles += _pair(lambda s, h: Segment(f"SLF{h}", start=(s * 34.0, 28.0, 26.0), end=(s * 38.0, -45.0, 30.0), radius=5.0))
    bundles += _pair(lambda s, h: Arc(f"AF{h}", centre=(s * 40.0, -40.0, 5.0), normal=(1.0, 0.0, 0.0), e1=(0.0, 1.0, 0.0),
                                      arc_radius=25.0, t_start=60.0, t_end=270.0, radius=4.5))
    bundles += _pair(lambda s, h: Segment(f"CG{h}", start=(s * 8.0, 32.0, 26.0), end=(s * 8.0, -52.0, 30.0), radius=3.5))
    bundles += _pair(lambda s, h: Segment(f"IFOF{h}", start=(s * 30.0, 28.0, -8.0), end=(s * 34.0, -82.0, 2.0), radius=5.0))
    return bundles


BUNDLES = default_bundles()
BUNDLE_NAMES = tuple(b.name for b in BUNDLES) + ("background",)
"""Population labels: one per bundle, then the background population (last)."""


def all_populations(points: np.ndarray, bundles: list[Segment | Arc] = BUNDLES) -> tuple[np.ndarray, np.ndarray]:
    """Fractions and directions of every population at template points.

    Parameters
    ----------
    points : ndarray, shape (P, 3)
        Template-space positions (mm).

    Returns
    -------
    fractions : ndarray, shape (P, B + 1), float32
        Bundle weights normalised so that they sum to 1 when they exceed 1; otherwise the
        remainder goes to the background population (last column).
    directions : ndarray, shape (P, B + 1, 3), float32
        Unit tangents (template space).
    """
    points = np.asarray(points, dtype=np.float32)
    n_pop = len(bundles) + 1
    fractions = np.zeros((points.shape[0], n_pop), dtype=np.float32)
    directions = np.zeros((points.shape[0], n_pop, 3), dtype=np.float32)
    for k, bundle in enumerate(bundles):
        lower, upper = bundle.bounding_box()
        rows = np.flatnonzero(np.all((points >= lower) & (points <= upper), axis=1))
        if rows.size:
            fractions[rows, k], directions[rows, k] = bundle.weight_and_tangent(points[rows])
    total = fractions[:, :-1].sum(axis=1)
    over = total > 1.0
    fractions[over, :-1] /= total[over, None]
    fractions[:, -1] = np.maximum(1.0 - total, 0.0)
    radial = points - BACKGROUND_CENTRE_MM.astype(np.float32)
    norm = np.linalg.norm(radial, axis=1, keepdims=True)
    directions[:, -1] = np.where(norm > 1e-3, radial / np.maximum(norm, 1e-3), np.float32([0.0, 0.0, 1.0]))
    return fractions, directions


MIN_POPULATION_FRACTION = 1e-3
"""Populations weaker than this within a sub-voxel are dropped."""


def strongest_populations(
    fractions: np.ndarray, directions: np.ndarray, keep: int = MAX_POPULATIONS, min_fraction: float = MIN_POPULATION_FRACTION
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``keep`` strongest populations per point, fractions renormalised to sum to 1.

    Populations below ``min_fraction`` get fraction 0 (before renormalising); the strongest one
    is always kept.

    Parameters
    ----------
    fractions : ndarray, shape (P, K)
    directions : ndarray, shape (P, K, 3)

    Returns
    -------
    labels : ndarray, shape (P, keep), int
        Population index (into :data:`BUNDLE_NAMES`).
    fractions : ndarray, shape (P, keep), float32
    directions : ndarray, shape (P, keep, 3), float32
    """
    labels = np.argsort(-fractions, axis=1, kind="stable")[:, :keep]
    kept = np.take_along_axis(fractions, labels, axis=1)
    kept[:, 1:] = np.where(kept[:, 1:] >= min_fraction, kept[:, 1:], 0.0)
    kept = kept / np.maximum(kept.sum(axis=1, keepdims=True), 1e-12)
    dirs = np.take_along_axis(directions, labels[:, :, None], axis=1)
    return labels, kept.astype(np.float32), dirs

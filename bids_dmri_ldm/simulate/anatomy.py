"""Subject anatomy: MNI152 tissue maps, a random smooth deformation, jittered tissue fractions.

Templates
---------
nilearn ships the MNI152 2009a (symmetric, skull-stripped) T1, GM and WM maps at 1 mm inside its
wheel (``nilearn/datasets/data``). They are read directly with nibabel: nothing is downloaded,
and importing :mod:`nilearn.datasets` (3.5 s on these machines) is avoided by locating the package
with :func:`importlib.util.find_spec`. Brain = T1 above 0.2 of its maximum, holes (cisterns) filled;
CSF = brain - GM - WM (clipped at 0); the ventricles come out as CSF.

Subject space
-------------
A subject's world point ``x`` (mm) shows the template tissue at

.. math:: y = A (x - c) + c + t + u(x),

with ``A`` a random near-identity linear map (scalings and rotations), ``t`` a small translation
and ``u`` a smooth random displacement field (Gaussian-filtered noise on a 10 mm lattice). WM and
GM fractions are further multiplied by smooth random fields (``1 + j``). Everything is drawn from
the subject's seed, so the 3T and 7T sessions see the same anatomy.

Partial volume
--------------
The subject's tissue maps are computed once on a fine lattice (1-2 mm) in world space. Scan
voxels (and their 2x2x2 sub-voxels) are axis-aligned boxes in the same space, so the box average
of the trilinearly interpolated lattice over each box is separable: one small matrix per axis
(:func:`box_average_matrix`), applied with :func:`numpy.tensordot`. This is exactly "simulate on
a finer grid and average down", without ever holding the fine grid.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache

import nibabel as nib
import numpy as np
from scipy import ndimage

from .acquisition import WORLD_CENTRE_MM

TISSUES = ("WM", "GM", "CSF")
"""Order of tissue channels on the last axis of tissue arrays."""

BRAIN_T1_THRESHOLD = 0.2
"""Fraction of the template T1 maximum above which a template voxel is brain."""

COARSE_SPACING_MM = 10.0
"""Spacing of the lattice carrying the random displacement and jitter fields."""

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@dataclass(frozen=True)
class Templates:
    """MNI152 tissue maps on the template's 1 mm grid.

    Attributes
    ----------
    channels : tuple of 3 ndarray, shape (X, Y, Z), float32
        WM, GM, CSF fractions in [0, 1], each contiguous (what
        :func:`scipy.ndimage.map_coordinates` wants); they sum to the brain mask.
    affine : ndarray, shape (4, 4)
        Template voxel-to-world (MNI mm) affine (1 mm, axis-aligned).
    near_brain : ndarray, shape (X, Y, Z), uint8
        Brain mask dilated by 2 mm.
    brain_box_mm : ndarray, shape (2, 3)
        World bounding box (lower, upper corners) of the brain.
    """

    channels: tuple[np.ndarray, np.ndarray, np.ndarray]
    affine: np.ndarray
    near_brain: np.ndarray
    brain_box_mm: np.ndarray


def nilearn_template_dir() -> str:
    """Folder of the MNI152 maps inside the installed nilearn wheel (no import, no download)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise RuntimeError("nilearn is not installed; it ships the MNI152 templates the simulator needs")
    return os.path.join(os.path.dirname(spec.origin), "datasets", "data")


@lru_cache(maxsize=1)
def load_templates() -> Templates:
    """Read the nilearn MNI152 T1/GM/WM maps and derive WM/GM/CSF fractions (cached)."""
    folder = nilearn_template_dir()
    images = {key: nib.load(os.path.join(folder, name)) for key, name in _TEMPLATE_FILES.items()}
    affine = images["t1"].affine.copy()
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise RuntimeError("unexpected MNI152 template affine (expected 1 mm, RAS, axis-aligned)")
    raw = {key: np.asarray(image.dataobj) for key, image in images.items()}  # uint8
    t1_mask = raw["t1"] > BRAIN_T1_THRESHOLD * raw["t1"].max()
    mask = t1_mask | ((raw["gm"].astype(np.uint16) + raw["wm"]) > 0)
    # Crop to the brain plus a margin: every later step is then ~2x cheaper.
    margin = 4
    lower = np.array([np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != d)))[0] for d in range(3)])
    upper = np.array([np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != d)))[-1] for d in range(3)])
    lower = np.maximum(lower - margin, 0)
    upper = np.minimum(upper + margin + 1, mask.shape)
    box = tuple(slice(lo, hi) for lo, hi in zip(lower, upper))
    affine[:3, 3] += lower  # 1 mm axis-aligned: voxel offset = mm offset
    brain = fill_holes(t1_mask[box]).astype(np.float32)  # cisterns below the T1 threshold
    gm = raw["gm"][box].astype(np.float32) / 255.0
    wm = raw["wm"][box].astype(np.float32) / 255.0
    total = gm + wm
    brain = np.maximum(brain, np.minimum(total, 1.0))
    gm -= np.maximum(total - brain, 0.0)  # keep WM + GM <= brain
    np.maximum(gm, 0.0, out=gm)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    is_brain = brain > 0
    near_brain = ndimage.maximum_filter(is_brain.view(np.uint8), size=5)  # brain dilated by 2 mm
    corners = np.zeros((2, 3))
    for axis in range(3):
        occupied = np.flatnonzero(is_brain.any(axis=tuple(a for a in range(3) if a != axis)))
        corners[:, axis] = affine[axis, 3] + occupied[[0, -1]]
    return Templates(channels=(wm, gm, csf), affine=affine, near_brain=near_brain, brain_box_mm=corners)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with enclosed background filled (connected components of the background that
    do not touch the array border). Same result as :func:`scipy.ndimage.binary_fill_holes`,
    which is several times slower (iterated dilations) on the 8.7 M-voxel template.
    """
    # Work inside the mask's bounding box plus a one-voxel border of background.
    lower = [int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != d)))[0]) for d in range(3)]
    upper = [int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != d)))[-1]) + 1 for d in range(3)]
    box = tuple(slice(lo, hi) for lo, hi in zip(lower, upper))
    inner = np.pad(mask[box], 1)
    labels, n_labels = ndimage.label(~inner)
    outside = np.zeros(n_labels + 1, dtype=bool)
    outside[np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()]))] = True
    outside[0] = True  # label 0 is the mask itself
    filled = mask.copy()
    filled[box] |= ~outside[labels[1:-1, 1:-1, 1:-1]]
    return filled


@dataclass(frozen=True)
class Subject:
    """Random anatomy of one subject, reproducible from its seed.

    Attributes
    ----------
    seed : int
    linear : ndarray, shape (3, 3)
        ``A``: maps subject offsets from the centre to template offsets.
    translation : ndarray, shape (3,)
        ``t`` in mm.
    coarse_origin : ndarray, shape (3,)
        World position (mm) of the first coarse-lattice node.
    coarse_fields : ndarray, shape (Lx, Ly, Lz, 5), float32
        Displacement ``u`` (mm, 3 channels) then WM and GM jitter ``j`` (2 channels).
    """

    seed: int
    linear: np.ndarray
    translation: np.ndarray
    coarse_origin: np.ndarray
    coarse_fields: np.ndarray

    def template_points(self, points: np.ndarray, fields: np.ndarray | None = None) -> np.ndarray:
        """Template (MNI mm) positions ``y`` of subject world points ``x`` ``(..., 3)``.

        ``fields`` are the coarse fields already interpolated at ``points`` ``(..., 5)``;
        computed (trilinearly) when not given.
        """
        if fields is None:
            fields = interpolate_coarse(self, points)
        return (points - WORLD_CENTRE_MM) @ self.linear.T + WORLD_CENTRE_MM + self.translation + fields[..., :3]

    def template_to_subject_directions(self, directions: np.ndarray) -> np.ndarray:
        """Unit subject-space directions of template-space fibre directions ``(..., 3)``.

        A tangent ``t`` in template space is the image of ``A^{-1} t`` in subject space (the small
        rotation from the Jacobian of the smooth displacement ``u`` is neglected).
        """
        out = directions @ np.linalg.inv(self.linear).T
        return out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)


def random_subject(
    seed: int,
    scale_sd: float = 0.04,
    rotation_sd_deg: float = 2.0,
    translation_sd_mm: float = 2.0,
    displacement_rms_mm: float = 2.5,
    jitter_rms: float = 0.08,
) -> Subject:
    """Draw a subject's deformation and tissue jitter from ``seed``.

    Parameters
    ----------
    seed : int
    scale_sd : float
        SD of the per-axis scaling (clipped to 3 SD).
    rotation_sd_deg : float
        SD of the rotation about each axis (degrees).
    translation_sd_mm : float
    displacement_rms_mm : float
        RMS of each component of the smooth displacement field.
    jitter_rms : float
        RMS of the smooth multiplicative WM / GM fraction jitter.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xA4A7]))
    scales = 1.0 + np.clip(rng.normal(0.0, scale_sd, 3), -3 * scale_sd, 3 * scale_sd)
    angles = np.radians(rng.normal(0.0, rotation_sd_deg, 3))
    linear = _rotation(angles) @ np.diag(1.0 / scales)  # a larger head maps to a smaller template offset
    translation = rng.normal(0.0, translation_sd_mm, 3)
    lower = np.array([-110.0, -150.0, -90.0])
    upper = np.array([110.0, 110.0, 130.0])
    shape = tuple(int(n) for n in np.ceil((upper - lower) / COARSE_SPACING_MM) + 1)
    fields = np.empty(shape + (5,), dtype=np.float32)
    for channel, rms in enumerate([displacement_rms_mm] * 3 + [jitter_rms] * 2):
        noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.0, mode="wrap")
        noise -= noise.mean()
        fields[..., channel] = noise * (rms / max(float(noise.std()), 1e-12))
    for channel in (3, 4):  # a global shift of the jitter: atrophy / WM volume differences
        fields[..., channel] += rng.normal(0.0, jitter_rms / 2.0)
    return Subject(seed=seed, linear=linear, translation=translation, coarse_origin=lower, coarse_fields=fields)


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix ``Rz @ Ry @ Rx`` of angles (radians) about x, y, z."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def interpolate_coarse(subject: Subject, points: np.ndarray, channels: int = 5) -> np.ndarray:
    """Trilinear interpolation of the subject's coarse fields at world points ``(..., 3)``.

    Returns ``(..., channels)``: the first ``channels`` fields (3: the displacement only).
    """
    coords = (np.asarray(points, dtype=np.float64) - subject.coarse_origin) / COARSE_SPACING_MM
    flat = coords.reshape(-1, 3).T
    out = np.stack(
        [
            ndimage.map_coordinates(subject.coarse_fields[..., c], flat, order=1, mode="nearest")
            for c in range(channels)
        ],
        axis=-1,
    )
    return out.reshape(np.shape(points)[:-1] + (channels,)).astype(np.float32)


def linear_interpolation_matrix(lattice: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Weights ``(n_targets, n_lattice)`` of 1-D linear interpolation (constant beyond the ends).

    Parameters
    ----------
    lattice : ndarray, shape (L,)
        Increasing, evenly spaced node positions.
    targets : ndarray, shape (T,)
    """
    spacing = lattice[1] - lattice[0]
    position = np.clip((targets - lattice[0]) / spacing, 0.0, lattice.size - 1.0)
    lower = np.minimum(np.floor(position).astype(int), lattice.size - 2)
    frac = position - lower
    weights = np.zeros((targets.size, lattice.size))
    rows = np.arange(targets.size)
    weights[rows, lower] = 1.0 - frac
    weights[rows, lower + 1] += frac
    return weights


def box_average_matrix(lattice: np.ndarray, lower: np.ndarray, upper: np.ndarray, n_quadrature: int = 16) -> np.ndarray:
    """Weights ``(n_boxes, n_lattice)``: mean of the linear interpolant over ``[lower, upper]``.

    The interval mean of the piecewise-linear interpolant is computed with an ``n_quadrature``
    midpoint rule (the "finer grid"); outside the lattice the interpolant is zero.

    Parameters
    ----------
    lattice : ndarray, shape (L,)
        Evenly spaced node positions (mm).
    lower, upper : ndarray, shape (B,)
        Box edges along this axis (mm).
    """
    spacing = lattice[1] - lattice[0]
    offsets = (np.arange(n_quadrature) + 0.5) / n_quadrature
    points = lower[:, None] + (upper - lower)[:, None] * offsets[None, :]  # (B, Q)
    position = (points - lattice[0]) / spacing
    inside = (position >= 0.0) & (position <= lattice.size - 1.0)
    position = np.clip(position, 0.0, lattice.size - 1.0)
    low = np.minimum(np.floor(position).astype(int), lattice.size - 2)
    frac = position - low
    weights = np.zeros((lower.size, lattice.size))
    rows = np.repeat(np.arange(lower.size), n_quadrature)
    np.add.at(weights, (rows, low.ravel()), ((1.0 - frac) * inside).ravel() / n_quadrature)
    np.add.at(weights, (rows, low.ravel() + 1), (frac * inside).ravel() / n_quadrature)
    return weights


@dataclass(frozen=True)
class TissueLattice:
    """A subject's WM/GM/CSF fractions sampled on an axis-aligned world lattice.

    Attributes
    ----------
    axes : tuple of ndarray
        Node positions (mm) along world x, y, z.
    tissue : ndarray, shape (Lx, Ly, Lz, 3), float32
        WM, GM, CSF fractions.
    """

    axes: tuple[np.ndarray, np.ndarray, np.ndarray]
    tissue: np.ndarray


def lattice_spacing(voxel_scale: float) -> float:
    """Spacing (mm) of the subject tissue lattice: the template's 1 mm, coarser for big voxels."""
    return float(np.clip(0.5 * voxel_scale, 1.0, 2.0))


def subject_tissue_lattice(subject: Subject, spacing_mm: float, margin_mm: float = 15.0, planes_per_chunk: int = 24) -> TissueLattice:
    """Warp the template tissue maps into the subject's world space on a lattice.

    Parameters
    ----------
    subject : Subject
    spacing_mm : float
        Lattice spacing.
    margin_mm : float
        Margin added around the template brain's bounding box (room for the deformation).
    planes_per_chunk : int
        z-planes processed at once (bounds memory).
    """
    templates = load_templates()
    lower, upper = templates.brain_box_mm[0] - margin_mm, templates.brain_box_mm[1] + margin_mm
    axes = tuple(np.arange(lo, hi + spacing_mm / 2, spacing_mm) for lo, hi in zip(lower, upper))
    origin = templates.affine[:3, 3]
    shape = tuple(a.size for a in axes)
    tissue = np.zeros(shape + (3,), dtype=np.float32)
    # Coarse fields (displacement, jitter) on the lattice, separably: x and y once, z per chunk.
    coarse_axes = [subject.coarse_origin[d] + COARSE_SPACING_MM * np.arange(subject.coarse_fields.shape[d]) for d in range(3)]
    wx, wy, wz = (linear_interpolation_matrix(coarse_axes[d], axes[d]).astype(np.float32) for d in range(3))
    partial = np.tensordot(wx, subject.coarse_fields, axes=(1, 0))  # (Lx, cy, cz, 5)
    partial = np.moveaxis(np.tensordot(wy, partial, axes=(1, 1)), 0, 1)  # (Lx, Ly, cz, 5)
    gx, gy = np.meshgrid(axes[0], axes[1], indexing="ij")
    near = templates.near_brain
    for start in range(0, shape[2], planes_per_chunk):
        stop = min(start + planes_per_chunk, shape[2])
        fields = np.moveaxis(np.tensordot(wz[start:stop], partial, axes=(1, 2)), 0, 2)  # (Lx, Ly, n, 5)
        points = np.empty(fields.shape[:3] + (3,), dtype=np.float32)
        points[..., 0] = gx[..., None]
        points[..., 1] = gy[..., None]
        points[..., 2] = axes[2][None, None, start:stop]
        coords = (subject.template_points(points, fields) - origin).reshape(-1, 3)
        # Only points landing near the template brain need interpolating (~1/3 of the box).
        nearest = np.rint(coords).astype(np.intp)
        inside = np.all((nearest >= 0) & (nearest < np.array(near.shape)), axis=1)
        rows = np.flatnonzero(inside)
        rows = rows[near[nearest[rows, 0], nearest[rows, 1], nearest[rows, 2]] > 0]
        sampled = np.zeros((coords.shape[0], 3), dtype=np.float32)
        for channel, volume in enumerate(templates.channels):
            sampled[rows, channel] = ndimage.map_coordinates(volume, coords[rows].T, order=1, mode="constant", cval=0.0)
        flat_fields = fields.reshape(-1, 5)
        sampled[rows] = jitter_tissue(sampled[rows], flat_fields[rows, 3:5])
        tissue[:, :, start:stop] = sampled.reshape(fields.shape[:3] + (3,))
    return TissueLattice(axes=axes, tissue=tissue)


def jitter_tissue(tissue: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    """Multiply WM and GM fractions by ``1 + j`` and give the rest of the brain to CSF.

    Parameters
    ----------
    tissue : ndarray, shape (..., 3)
        WM, GM, CSF fractions summing to the brain fraction.
    jitter : ndarray, shape (..., 2)
        WM and GM jitter ``j`` (dimensionless).

    Returns
    -------
    ndarray, shape (..., 3), float32
        Fractions still summing to the brain fraction, all non-negative.
    """
    brain = tissue.sum(axis=-1)
    wm = tissue[..., 0] * np.clip(1.0 + jitter[..., 0], 0.5, 1.5)
    gm = tissue[..., 1] * np.clip(1.0 + jitter[..., 1], 0.5, 1.5)
    total = wm + gm
    shrink = np.where(total > brain, brain / np.maximum(total, 1e-12), 1.0)
    wm, gm = wm * shrink, gm * shrink
    csf = np.maximum(brain - wm - gm, 0.0)
    return np.stack([wm, gm, csf], axis=-1).astype(np.float32)


def voxel_edges(affine: np.ndarray, shape: tuple[int, int, int], subdivisions: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """World-space edges ``(lower, upper)`` along x, y, z of the (sub-)voxels of an axis-aligned grid.

    Each voxel is split into ``subdivisions`` equal parts per axis; entries follow the voxel
    index order (for the LAS x axis, world x decreases with the index).
    """
    edges = []
    for axis in range(3):
        step = affine[axis, axis]
        n = shape[axis] * subdivisions
        centres = affine[axis, 3] + step * ((np.arange(n) + 0.5) / subdivisions - 0.5)
        half = abs(step) / subdivisions / 2.0
        edges.append((centres - half, centres + half))
    return edges


def check_axis_aligned(affine: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``affine`` is diagonal (the separable box average needs it)."""
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))):
        raise ValueError("the simulator's partial-volume model needs an axis-aligned grid")

"""The automatic brain mask (core.mask) against known answers: the simulator's truth brain at two
voxel scales (3T and 7T grids of each), dipy's real all-tissue crop, and robustness to intensity
scale, NaN/Inf, tiny and anisotropic volumes.

The simulator's input is a skull-stripped template, so its head is the brain plus noise: a mask
that covers the truth brain without spreading into the air is the whole answer there.
"""
from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from conftest import simulated_scan

from bids_dmri_ldm.core.mask import ball, brain_mask, compute_brain_mask

#: At most this fraction of the mask may lie outside the truth brain (partial-volume edge voxels
#: whose brain fraction is below the truth's 0.5 threshold; measured 0.06-0.10).
MAX_OUTSIDE = 0.15


def coverage(mask: np.ndarray, truth: np.ndarray) -> float:
    return float((mask & truth).sum() / truth.sum())


def outside(mask: np.ndarray, truth: np.ndarray) -> float:
    return float((mask & ~truth).sum() / mask.sum())


@pytest.mark.parametrize("voxel_scale", [4.0, 3.0])
@pytest.mark.parametrize("session", ["3T", "7T"])
def test_covers_the_simulated_brain(simulated_dataset, voxel_scale, session):
    """>= 99 % of the truth brain (CSF and cortex included) inside, little air; with or without
    the mean DW image; a single b0 gives the same coverage."""
    _, bvals, b0, dw, truth, affine = simulated_scan(simulated_dataset(voxel_scale), session)
    result = compute_brain_mask(b0, affine, dw)
    assert result.background
    assert coverage(result.mask, truth) >= 0.99
    assert outside(result.mask, truth) <= MAX_OUTSIDE
    without_dw = brain_mask(b0, affine)
    assert coverage(without_dw, truth) >= 0.99 and outside(without_dw, truth) <= MAX_OUTSIDE


def test_dipy_median_otsu_fails_the_coverage_test(simulated_dataset):
    """The coverage test is able to fail: the mask it replaces misses a large part of the brain."""
    from dipy.segment.mask import median_otsu

    _, _, b0, _, truth, affine = simulated_scan(simulated_dataset(4.0), "3T")
    _, old = median_otsu(b0, median_radius=4, numpass=4)
    assert coverage(old, truth) < 0.9  # measured 0.64
    assert coverage(brain_mask(b0, affine), truth) >= 0.99


def _small64d():
    """dipy's real crop, read from the files shipped inside the dipy wheel (no fetcher)."""
    import dipy

    folder = os.path.join(os.path.dirname(dipy.__file__), "data", "files")
    img = nib.load(os.path.join(folder, "small_64D.nii"))
    bvals = np.loadtxt(os.path.join(folder, "small_64D.bval"))
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    return data[..., bvals <= 50].mean(-1), data[..., bvals > 50].mean(-1), img.affine


def test_all_tissue_crop_is_kept():
    """small_64D is all brain tissue (white matter, grey matter, CSF): nothing is background."""
    b0, dw, affine = _small64d()
    for result in (compute_brain_mask(b0, affine, dw), compute_brain_mask(b0, affine)):
        assert not result.background
        assert result.mask.mean() >= 0.99


def test_interior_crop_of_a_simulated_brain_is_kept(simulated_dataset):
    """A box inside the simulated brain (with ventricles) is recognised as all tissue."""
    _, _, b0, dw, truth, affine = simulated_scan(simulated_dataset(3.0), "3T")
    centre = np.round(np.argwhere(truth).mean(axis=0)).astype(int)
    box = tuple(slice(c - 5, c + 6) for c in centre)
    assert truth[box].all()
    for result in (compute_brain_mask(b0[box], affine, dw[box]), compute_brain_mask(b0[box], affine)):
        assert not result.background and result.mask.all()


def _sphere_phantom(shape=(40, 40, 40), radius=14.0):
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"), -1)
    r = np.linalg.norm(grid, axis=-1)
    return r <= radius, r <= radius / 3


def _rician(signal, sigma, rng):
    return np.hypot(signal + rng.normal(0, sigma, signal.shape), rng.normal(0, sigma, signal.shape))


def test_the_mean_dw_image_tells_a_low_snr_head_from_air():
    """b0 SNR 4 in tissue: the air is too bright relative to the head for the b0 alone (taken for
    an all-tissue crop, everything kept), but it does not attenuate at b = 1000 while tissue does,
    so with the mean DW image the head is found."""
    rng = np.random.default_rng(1)
    brain, core = _sphere_phantom()
    tissue = np.where(core, 3.0, 1.0) * brain  # CSF-bright core, sigma = 0.25: tissue SNR 4
    b0 = _rician(tissue * 1.0, 0.25, rng)
    dw = np.mean([_rician(tissue * np.where(core, 0.05, 0.4), 0.25, rng) for _ in range(30)], axis=0)
    assert not compute_brain_mask(b0).background  # the b0 alone cannot tell
    result = compute_brain_mask(b0, None, dw)
    assert result.background
    assert coverage(result.mask, brain) >= 0.99 and outside(result.mask, brain) <= 0.2


def test_the_mean_dw_image_tells_a_dark_tissue_crop_from_air():
    """A crop of dark tissue around bright CSF: dark enough at the border to look like air in the
    b0, but it attenuates under diffusion weighting, so with the mean DW image nothing is lost."""
    rng = np.random.default_rng(2)
    _, core = _sphere_phantom(radius=45.0)  # core radius 15 voxels in a 40³ crop
    b0 = _rician(np.where(core, 12.0, 1.0), 0.02, rng)  # CSF 12x the surrounding tissue
    dw = _rician(np.where(core, 0.6, 0.4), 0.02, rng)
    assert compute_brain_mask(b0).background  # the b0 alone is fooled
    result = compute_brain_mask(b0, None, dw)
    assert not result.background and result.mask.all()


@pytest.mark.parametrize("factor, dtype", [(1e-6, np.float32), (1e30, np.float32), (1e300, np.float64),
                                           (1e-300, np.float64)])
def test_intensity_scale_does_not_change_the_mask(simulated_dataset, factor, dtype):
    _, _, b0, dw, _, affine = simulated_scan(simulated_dataset(4.0), "7T")
    reference = brain_mask(b0, affine, dw)
    scaled_b0 = b0.astype(dtype) * dtype(factor)
    scaled_dw = dw.astype(dtype) * dtype(factor)
    assert np.all(np.isfinite(scaled_b0)) and scaled_b0.max() > 0
    np.testing.assert_array_equal(brain_mask(scaled_b0, affine, scaled_dw), reference)


def test_nan_inf_and_negative_values(simulated_dataset):
    _, _, b0, dw, truth, affine = simulated_scan(simulated_dataset(4.0), "3T")
    reference = brain_mask(b0, affine, dw)
    broken = b0.copy()
    inner = tuple(slice(c - 1, c + 2) for c in np.round(np.argwhere(truth).mean(axis=0)).astype(int))
    broken[inner] = np.nan  # a hole inside the brain is filled
    broken[0, 0, :] = np.inf
    broken[1, 0, :] = -np.inf
    broken[2, 0, :] = -5.0
    mask = brain_mask(broken, affine, dw)
    assert coverage(mask, truth) >= 0.99
    assert np.mean(mask[3:] != reference[3:]) < 1e-3  # the border median moved a little
    assert not brain_mask(np.full((4, 4, 4), np.nan)).any()
    assert not brain_mask(np.zeros((5, 5, 5))).any()


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 1, 3), (3, 3, 3)])
def test_tiny_volumes(shape):
    volume = np.random.default_rng(0).uniform(50, 100, shape)
    mask = brain_mask(volume, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert mask.shape == shape and mask.all()  # no background to find: all tissue


def test_anisotropic_voxels(simulated_dataset):
    """Every other slice of a scan (voxels twice as thick in z) still covers its truth brain; the
    closing ball is an ellipsoid in voxel units."""
    _, _, b0, dw, truth, affine = simulated_scan(simulated_dataset(3.0), "3T")
    thick = affine.copy()
    thick[:3, 2] *= 2
    mask = brain_mask(b0[:, :, ::2], thick, dw[:, :, ::2])
    assert coverage(mask, truth[:, :, ::2]) >= 0.99 and outside(mask, truth[:, :, ::2]) <= MAX_OUTSIDE
    element = ball(2.0, (1.0, 1.0, 2.0))
    assert element.shape == (5, 5, 3)  # 2 mm: two voxels along x and y, one along z
    assert element[0, 2, 1] and element[2, 2, 0] and not element[1, 2, 0]  # sqrt(1 + 4) mm > 2 mm


def test_skull_stripped_input(simulated_dataset):
    """Zero outside the brain (a skull-stripped or zero-padded input): the brain is found."""
    _, _, b0, _, truth, affine = simulated_scan(simulated_dataset(4.0), "3T")
    stripped = np.where(truth, b0, 0)
    result = compute_brain_mask(stripped, affine)
    assert result.background and result.air_level == 0.0
    np.testing.assert_array_equal(result.mask, truth | result.mask)
    assert coverage(result.mask, truth) == 1.0

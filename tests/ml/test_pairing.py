"""Pairing 3T and 7T by position (world space) and one canonical voxel orientation."""
from __future__ import annotations

import numpy as np
import pytest

from bids_dmri_ldm.ml.data import RishScan, target_on_source
from bids_dmri_ldm.ml.normalise import fit_normalisation
from bids_dmri_ldm.ml.orientation import Reorientation, canonical
from bids_dmri_ldm.ml.training_data import prepare_scans, stack_pairs

from .conftest import tiny_config

CENTRE = np.array([3.0, -5.0, 8.0])  # world mm of the head's centre


def head_scan(voxel_mm: float, shape: tuple[int, int, int], origin_mm: np.ndarray, radius_mm: float = 26.0,
              ratio=(1.0, 1.0, 1.0)) -> RishScan:
    """RISH of a smooth analytic head sampled on an axis-aligned grid (RAS, ``voxel_mm``).

    The values are smooth functions of the world position, so two grids of the same head
    sample the same field; the brain is a ball of ``radius_mm`` around :data:`CENTRE`.
    """
    affine = np.diag([voxel_mm] * 3 + [1.0])
    affine[:3, 3] = origin_mm
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    xyz = ijk * voxel_mm + origin_mm - CENTRE
    u = xyz / 30.0
    wave = 1.0 + 0.3 * np.sin(2.0 * u[..., 0] + 0.5) * np.cos(1.5 * u[..., 1]) + 0.2 * u[..., 2]
    rish = np.stack([3.0 * wave, 0.2 * wave ** 2, 0.03 * wave ** 3], -1) * np.asarray(ratio)
    mask = np.linalg.norm(xyz, axis=-1) < radius_mm
    return RishScan(rish.astype(np.float32), mask, affine)


def _targets(source: RishScan, target: RishScan, cfg: dict) -> np.ndarray:
    norm = fit_normalisation([source.rish], [source.mask], cfg["orders"])
    scans_3t, _, targets = prepare_scans({"p": source}, {"p": target})
    return stack_pairs([(scans_3t["p"], targets["p"])], norm, cfg)[1].numpy()


def test_targets_do_not_depend_on_the_7t_field_of_view():
    """The same 7T head on a lattice shifted and padded differently yields the same model-grid
    targets: pairing follows world position, not each scan's own bounding box."""
    cfg = tiny_config()
    source = head_scan(2.5, (30, 32, 28), np.array([-34.0, -44.0, -27.0]), ratio=(1, 1, 1))
    seven_a = head_scan(2.1, (36, 38, 34), np.array([-35.0, -45.0, -28.0]), ratio=(0.85, 0.75, 0.7))
    # the same lattice with 6 more voxels before x and 3 after z: identical sample points
    seven_b = head_scan(2.1, (42, 38, 37), np.array([-35.0 - 6 * 2.1, -45.0, -28.0]), ratio=(0.85, 0.75, 0.7))
    # another lattice (shifted by about half a voxel): equal within interpolation error
    seven_c = head_scan(2.1, (37, 38, 35), np.array([-36.05, -44.0, -27.5]), ratio=(0.85, 0.75, 0.7))
    a, b, c = (_targets(source, s, cfg) for s in (seven_a, seven_b, seven_c))
    np.testing.assert_allclose(a, b, atol=1e-6)
    # brain voxels of both (background is -1, brain ~0..1), one model voxel from the brain's edge,
    # where the two lattices' masks differ by a voxel
    brain = _interior((a > 0) & (c > 0))
    assert brain.mean() > 0.15
    assert np.abs(a - c)[brain].max() < 0.01  # normalised log-RISH units
    # a 7T brain mask smaller than the 3T one (as another masking would give): cropping each scan
    # by its own bounding box, as training used to, puts other places side by side
    seven_d = head_scan(2.1, (36, 38, 34), np.array([-35.0, -45.0, -28.0]), radius_mm=21.0,
                        ratio=(0.85, 0.75, 0.7))
    d = _targets(source, seven_d, cfg)
    inner = _interior((a > 0) & (d > 0))
    own_box = _own_box_targets(seven_d, source, cfg)
    assert np.abs(d - a)[inner].max() < 0.01
    assert np.abs(own_box - a)[inner].mean() > 10 * np.abs(d - a)[inner].mean()


def _interior(mask: np.ndarray) -> np.ndarray:
    """Model-grid masks ``(N, 1, X, Y, Z)`` eroded by one voxel."""
    from scipy.ndimage import binary_erosion

    return np.stack([binary_erosion(m[0])[None] for m in mask])


def _own_box_targets(target: RishScan, source: RishScan, cfg: dict) -> np.ndarray:
    from bids_dmri_ldm.ml.data import to_model_grid
    from bids_dmri_ldm.ml.normalise import normalise

    norm = fit_normalisation([source.rish], [source.mask], cfg["orders"])
    x, _, _ = to_model_grid(normalise(target.rish, target.mask, norm), target.mask, tuple(cfg["grid"]),
                            cfg["translation"]["crop_margin"])
    return x.numpy()


def test_target_on_source_is_false_outside_the_7t_field_of_view():
    source = head_scan(2.5, (30, 32, 28), np.array([-34.0, -44.0, -27.0]))
    cut = head_scan(2.1, (20, 38, 34), np.array([-35.0, -45.0, -28.0]))  # covers x < 5 mm only
    on3 = target_on_source(cut, source)
    x_world = source.affine[0, 0] * np.arange(30) + source.affine[0, 3]
    beyond = x_world > -35.0 + 19 * 2.1 + 2.1
    assert not on3.mask[beyond].any() and on3.mask[~beyond].any()
    assert (on3.rish >= 0).all()


@pytest.mark.parametrize("affine", [
    np.array([[-2.0, 0, 0, 30], [0, 2, 0, -40], [0, 0, 2, -20], [0, 0, 0, 1]]),          # LAS
    np.array([[0, 2.0, 0, -30], [2, 0, 0, -40], [0, 0, -2, 20], [0, 0, 0, 1]]),          # permuted, I
    np.array([[1.9, 0.3, 0, -30], [-0.3, 1.9, 0, -40], [0, 0, 2, -20], [0, 0, 0, 1]]),   # oblique
])
def test_canonical_orientation_round_trips_and_matches_nibabel(affine):
    import nibabel as nib

    rng = np.random.default_rng(1)
    volume = rng.random((5, 6, 7, 3)).astype(np.float32)
    reo = Reorientation.of(affine, volume.shape)
    reference = nib.as_closest_canonical(nib.Nifti1Image(volume, affine))
    np.testing.assert_array_equal(reo.to_canonical(volume), np.asanyarray(reference.dataobj))
    np.testing.assert_allclose(reo.canonical_affine, reference.affine)
    np.testing.assert_array_equal(reo.from_canonical(reo.to_canonical(volume)), volume)
    np.testing.assert_array_equal(canonical(volume, affine)[0], reo.to_canonical(volume))


def test_training_targets_do_not_depend_on_the_storage_order():
    """A 3T/7T pair stored with the 7T y axis flipped and the 3T's x/z swapped gives the same
    model-grid inputs and targets as the RAS pair."""
    cfg = tiny_config()
    source = head_scan(2.5, (30, 32, 28), np.array([-34.0, -44.0, -27.0]))
    target = head_scan(2.1, (36, 38, 34), np.array([-35.0, -45.0, -28.0]), ratio=(0.85, 0.75, 0.7))
    norm = fit_normalisation([source.rish], [source.mask], cfg["orders"])

    def stacked(s, t):
        s3, _, t7 = prepare_scans({"p": s}, {"p": t})
        return [x.numpy() for x in stack_pairs([(s3["p"], t7["p"])], norm, cfg)]

    flip_y = np.diag([1.0, -1.0, 1.0, 1.0])
    flip_y[1, 3] = target.mask.shape[1] - 1
    target_flipped = RishScan(target.rish[:, ::-1], target.mask[:, ::-1], target.affine @ flip_y)
    swap_xz = np.array([[0, 0, 1.0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    source_swapped = RishScan(np.swapaxes(source.rish, 0, 2), np.swapaxes(source.mask, 0, 2),
                              source.affine @ swap_xz)
    for got, want in zip(stacked(source_swapped, target_flipped), stacked(source, target)):
        np.testing.assert_array_equal(got, want)

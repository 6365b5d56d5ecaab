import numpy as np
import pytest

from bids_dmri_ldm.core.metrics import angular_error_deg, nmse, ssim3d
from bids_dmri_ldm.core.resample import (
    output_grid,
    resample,
    resample_mask,
    voxel_sizes,
)


def oblique_affine(zoom):
    theta = 0.3
    R = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    A = np.eye(4)
    A[:3, :3] = R @ np.diag([-zoom, zoom, zoom])  # non-RAS (x flipped) and oblique
    A[:3, 3] = [10.0, -20.0, 5.0]
    return A


def world_coords(affine, shape):
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    return (idx @ affine[:3, :3].T + affine[:3, 3]).reshape(tuple(shape) + (3,))


def test_output_grid_keeps_fov_and_axes():
    A = oblique_affine(2.0)
    new_A, new_shape = output_grid(A, (10, 12, 8), 1.0)
    assert new_shape == (20, 24, 16)
    np.testing.assert_allclose(voxel_sizes(new_A), 1.0)
    np.testing.assert_allclose(new_A[:3, :3] / 1.0, A[:3, :3] / 2.0, atol=1e-12)
    # outer corners coincide
    corner_old = A[:3, 3] - A[:3, :3] @ [0.5, 0.5, 0.5]
    corner_new = new_A[:3, 3] - new_A[:3, :3] @ [0.5, 0.5, 0.5]
    np.testing.assert_allclose(corner_old, corner_new, atol=1e-9)
    same_A, same_shape = output_grid(A, (10, 12, 8), None)
    assert same_shape == (10, 12, 8) and np.allclose(same_A, A)


def test_resample_reproduces_a_linear_field_in_world_space():
    A = oblique_affine(2.0)
    shape = (12, 12, 10)
    field = lambda xyz: 0.5 * xyz[..., 0] - 0.2 * xyz[..., 1] + 0.1 * xyz[..., 2]  # noqa: E731
    data = field(world_coords(A, shape)).astype(np.float32)
    new_A, new_shape = output_grid(A, shape, 1.5)
    out = resample(np.stack([data, 2 * data], -1), A, new_A, new_shape, order=3)
    truth = field(world_coords(new_A, new_shape))
    inner = tuple(slice(6, s - 6) for s in new_shape)  # spline boundary effects decay inward
    np.testing.assert_allclose(out[inner][..., 0], truth[inner], atol=4e-3)
    np.testing.assert_allclose(out[inner][..., 1], 2 * truth[inner], atol=4e-3)


def test_mask_resampling():
    mask = np.zeros((10, 10, 10), bool)
    mask[2:8, 2:8, 2:8] = True
    A = np.diag([2.0, 2.0, 2.0, 1.0])
    new_A, new_shape = output_grid(A, mask.shape, 1.0)
    out = resample_mask(mask, A, new_A, new_shape)
    assert out.dtype == bool and abs(out.sum() / 8 - mask.sum()) / mask.sum() < 0.1


def test_metrics_known_answers():
    rng = np.random.default_rng(0)
    ref = rng.uniform(1, 2, size=(16, 16, 16)).astype(np.float32)
    mask = np.ones(ref.shape, bool)
    assert nmse(ref, ref, mask) == 0.0
    assert nmse(2 * ref, ref, mask) == pytest.approx(1.0)
    assert ssim3d(ref, ref, mask) == pytest.approx(1.0, abs=1e-5)
    noisy = ref + rng.normal(0, 0.3, ref.shape).astype(np.float32)
    assert 0.0 < ssim3d(noisy, ref, mask) < 0.9
    assert angular_error_deg(np.array([1, 0, 0]), np.array([-1, 0, 0])) == pytest.approx(0.0)
    assert angular_error_deg(np.array([1, 0, 0]), np.array([0, 1, 0])) == pytest.approx(90.0)


def test_fill_outside_mask_takes_the_nearest_inside_value():
    """Outside the mask each voxel takes its nearest inside voxel's value (two blocks of different
    values: each side of the gap gets its block's); a map that is one value inside the mask is that
    value everywhere (the shortcut equals the distance transform's result); 4D maps per channel."""
    from scipy import ndimage

    from bids_dmri_ldm.core.resample import fill_outside_mask

    mask = np.zeros((12, 5, 4), bool)
    mask[1:3, 1:4, 1:3] = True
    mask[9:11, 1:4, 1:3] = True
    varying = np.zeros(mask.shape + (2,), np.float32)
    varying[:6, ..., 0], varying[6:, ..., 0] = 2.0, 5.0
    varying[..., 1] = 0.7                                # one value inside: the shortcut's case ...
    filled = fill_outside_mask(varying, mask)            # ... but channel 0 varies: the transform
    assert np.all(filled[:5, ..., 0] == 2.0) and np.all(filled[7:, ..., 0] == 5.0)
    assert np.all(filled[..., 1] == np.float32(0.7))
    constant = np.where(mask, np.float32(1.3), np.float32(-9.0))
    index = ndimage.distance_transform_edt(~mask, return_distances=False, return_indices=True)
    quick = fill_outside_mask(constant, mask)
    assert quick.dtype == np.float32 and quick.flags.writeable
    np.testing.assert_array_equal(quick, constant[tuple(index)])
    np.testing.assert_array_equal(fill_outside_mask(constant[..., None], mask), constant[tuple(index)][..., None])
    np.testing.assert_array_equal(fill_outside_mask(constant, np.zeros_like(mask)), constant)  # empty mask


def test_fill_outside_mask_takes_a_transform_made_elsewhere_and_asks_for_it_only_when_needed():
    """The index of :func:`nearest_inside_index` (or a callable returning it) gives the fill its own
    transform gives; a map that is one value inside the mask never calls for it."""
    from bids_dmri_ldm.core.resample import fill_outside_mask, nearest_inside_index

    rng = np.random.default_rng(4)
    mask = np.zeros((9, 7, 6), bool)
    mask[2:6, 1:5, 2:5] = True
    mask[7, 5, 1] = True
    varying = rng.uniform(0.5, 1.5, mask.shape + (3,)).astype(np.float32)
    index = nearest_inside_index(mask)
    assert index.shape == (3,) + mask.shape
    expected = fill_outside_mask(varying, mask)
    np.testing.assert_array_equal(fill_outside_mask(varying, mask, index), expected)
    asked = []
    np.testing.assert_array_equal(fill_outside_mask(varying, mask, lambda: asked.append(1) or index), expected)
    assert asked == [1]
    constant = np.where(mask[..., None], np.float32(0.8), varying)
    np.testing.assert_array_equal(fill_outside_mask(constant, mask, lambda: pytest.fail("not needed")),
                                  np.full(constant.shape, np.float32(0.8)))
    assert nearest_inside_index(np.zeros_like(mask)) is None

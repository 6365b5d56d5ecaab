"""The fast paths of issue 15 give the values of the straightforward code they replaced."""
import numpy as np
from scipy.ndimage import gaussian_filter

from bids_dmri_ldm.core.sh import SHModel, rish_features, sh_basis
from bids_dmri_ldm.core.signal import fit_shell_rish, fit_shell_sh
from bids_dmri_ldm.core.smooth import smooth_in_mask, smoothed_scale_maps


def _reference_smooth(volumes, mask, sigma):
    """The former one-filter-at-a-time smoothing (G * mask filtered per call)."""
    weight = gaussian_filter(mask.astype(np.float32), sigma, mode="nearest")
    out = np.empty_like(volumes, dtype=np.float32)
    for k in range(volumes.shape[-1]):
        num = gaussian_filter(np.where(mask, volumes[..., k], 0).astype(np.float32), sigma, mode="nearest")
        out[..., k] = np.where(weight > 1e-6, num / np.maximum(weight, 1e-6), volumes[..., k])
    return out


def test_separable_smoothing_matches_scipys_filter_one_at_a_time():
    """The matrix-product Gaussian equals scipy's gaussian_filter (mode nearest) to float32
    rounding, with sigmas larger than the volume, a zero sigma and an odd mask; so do the
    mask-normalised smoothing and the smoothed scale maps."""
    from bids_dmri_ldm.core.smooth import SeparableGaussian

    rng = np.random.default_rng(0)
    volumes = rng.random((14, 12, 10, 3)).astype(np.float32)
    mask = rng.random((14, 12, 10)) > 0.3
    for sigma in ([1.5, 2.0, 2.5], [0.0, 0.7, 30.0]):
        np.testing.assert_allclose(SeparableGaussian(mask.shape, sigma)(volumes[..., 0]),
                                   gaussian_filter(volumes[..., 0], sigma, mode="nearest"), rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(smooth_in_mask(volumes, mask, sigma), _reference_smooth(volumes, mask, sigma),
                                   rtol=2e-5, atol=1e-6)
    target, reference = 2 * volumes, volumes + 0.5
    lam = smoothed_scale_maps(target, reference, mask, sigma)
    expected = np.sqrt(_reference_smooth(target, mask, sigma) / (_reference_smooth(reference, mask, sigma) + np.float32(1e-8)))
    np.testing.assert_allclose(lam, expected, rtol=2e-5)


def _shell(seed=1):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(30, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    coeffs = rng.normal(scale=0.05, size=(9, 8, 7, 15)).astype(np.float32)
    coeffs[..., 0] = 0.6
    att = np.clip(coeffs @ sh_basis(g, 4)[0].T.astype(np.float32), 0, 1)
    s0 = rng.uniform(500, 1500, size=(9, 8, 7)).astype(np.float32)
    data = np.concatenate([np.repeat(s0[..., None], 3, -1), s0[..., None] * att], -1)
    return np.rint(data).astype(np.int16), g


def test_fit_in_memory_order_and_rish_in_the_same_pass():
    """Fortran-ordered int16 data (as nibabel maps a .nii) give the C-order result; the RISH
    taken per chunk equal rish_features of the coefficients; masked and full-grid paths agree
    with the normalise-then-fit reference."""
    data, g = _shell()
    model = SHModel(g, 4)
    b0, dw = np.arange(3), np.arange(3, 33)
    everywhere = np.ones(data.shape[:3], bool)
    s0_c, c_c, r_c = fit_shell_rish(data, b0, dw, everywhere, model.fit_matrix, model.l_values, n_threads=2,
                                    chunk_voxels=50)
    s0_f, c_f, r_f = fit_shell_rish(np.asfortranarray(data), b0, dw, everywhere, model.fit_matrix, model.l_values,
                                    n_threads=1, chunk_voxels=64)
    np.testing.assert_allclose(c_f, c_c, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s0_f, s0_c, rtol=1e-6)
    np.testing.assert_allclose(r_c, rish_features(c_c, model.l_values), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(r_f, r_c, rtol=1e-5, atol=1e-9)
    s0_ref = np.maximum(data[..., b0].astype(np.float64).mean(axis=-1), 1.0)
    att = np.clip(data[..., dw] / s0_ref[..., None], 0.0, 1.0)  # S/S0 in [0, 1]
    np.testing.assert_allclose(c_c, att @ model.fit_matrix.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s0_c, s0_ref, rtol=1e-6)
    mask = np.zeros(data.shape[:3], bool)
    mask[2:7, 1:6, 2:5] = True
    _, c_m = fit_shell_sh(np.asfortranarray(data), b0, dw, mask, model.fit_matrix, chunk_voxels=7)
    np.testing.assert_allclose(c_m[mask], c_c[mask], rtol=1e-5, atol=1e-7)
    assert not c_m[~mask].any()
    float_data = np.asfortranarray(data.astype(np.float32))
    before = float_data.copy()
    fit_shell_sh(float_data, b0, dw, everywhere, model.fit_matrix)
    np.testing.assert_array_equal(float_data, before)  # float32 input is read through views: unchanged


def test_rebuilt_volumes_from_reused_buffers_equal_the_direct_formula(monkeypatch):
    """output_volumes reuses one block (and one scatter volume) across batches: with batches of
    2 volumes over a region smaller than the grid, every volume (copied as the writer does)
    is S0 max(Y C, 0) inside the region and 0 outside, int16-quantised with a slope."""
    import bids_dmri_ldm.core.rebuild as rebuild

    rng = np.random.default_rng(11)
    shape = (6, 5, 4)
    region = np.zeros(shape, bool)
    region[1:5, 1:4, :3] = True
    voxels = np.flatnonzero(region.ravel(order="F"))
    coeffs = rng.normal(size=(6, voxels.size)).astype(np.float32)
    coeffs[0] += 3.0
    s0 = rng.uniform(50, 100, voxels.size).astype(np.float32)
    dirs = rng.normal(size=(7, 3))
    basis = np.vstack([np.zeros((1, 6)), sh_basis(dirs / np.linalg.norm(dirs, axis=1, keepdims=True), 2)[0]])
    basis = basis.astype(np.float32)
    out_shell = np.r_[-1, np.zeros(7, int)]
    out_source = np.r_[0, np.full(7, -2)]
    b0 = rng.uniform(0, 100, shape).astype(np.float32)
    monkeypatch.setattr(rebuild, "REBUILD_BATCH_BYTES", 2 * 2 * voxels.size)  # 2 int16 volumes a batch
    slope = 0.01
    volumes = [np.array(v) for v in rebuild.output_volumes(out_shell, out_source, lambda t: b0.copy(), [coeffs], s0,
                                                           basis, shape, region, voxels, slope)]
    assert len(volumes) == 8
    np.testing.assert_array_equal(volumes[0], np.where(region, b0, 0))
    for row, volume in zip(basis[1:], volumes[1:]):
        expected = np.zeros(shape, np.float32, order="F")
        expected.ravel(order="F")[voxels] = np.maximum(row @ coeffs, 0) * s0 / np.float32(slope)  # a view
        assert volume.dtype == np.int16
        np.testing.assert_allclose(volume, np.rint(expected), atol=1)
        assert not volume[~region].any()
    assert len({v.tobytes() for v in volumes[1:]}) == 7  # seven different volumes, none overwritten

"""Known-answer tests of the SH / RISH core."""
import numpy as np
import pytest
from dipy.core.sphere import HemiSphere, Sphere, disperse_charges
from dipy.reconst.shm import sf_to_sh
from scipy.spatial.transform import Rotation

from bids_dmri_ldm.core import sh
from bids_dmri_ldm.core.metrics import angular_error_deg, tensor_fit
from bids_dmri_ldm.core.rebuild import output_volumes
from bids_dmri_ldm.core.signal import fit_shell_sh


def directions(n, seed=0):
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 3))
    hemi = HemiSphere(xyz=xyz / np.linalg.norm(xyz, axis=1, keepdims=True))
    hemi, _ = disperse_charges(hemi, 200)
    return hemi.vertices


def tensor_signal(bvecs, evec, b=1000.0, evals=(1.7e-3, 0.3e-3, 0.3e-3)):
    evec = np.asarray(evec, float) / np.linalg.norm(evec)
    ortho = np.cross(evec, [0.0, 0.0, 1.0] if abs(evec[2]) < 0.9 else [1.0, 0.0, 0.0])
    ortho /= np.linalg.norm(ortho)
    R = np.stack([evec, ortho, np.cross(evec, ortho)], axis=1)
    D = R @ np.diag(evals) @ R.T
    return np.exp(-b * np.einsum("ni,ij,nj->n", bvecs, D, bvecs))


def _rebuild(s0, b0, coeffs, basis):
    """The pipeline's rebuild (:func:`~bids_dmri_ldm.core.rebuild.output_volumes`) of every voxel:
    the b0 volumes, then ``S0 * max(C Y(g), 0)`` on each row of ``basis``."""
    shape, n_b0 = s0.shape, b0.shape[-1]
    n_out = n_b0 + basis.shape[0]
    out_shell = np.r_[np.full(n_b0, -1), np.zeros(basis.shape[0], int)]
    out_source = np.r_[np.arange(n_b0), np.full(basis.shape[0], -2)]
    flat = np.ascontiguousarray(coeffs.reshape(-1, coeffs.shape[-1], order="F").T, dtype=np.float32)
    full_basis = np.vstack([np.zeros((n_b0, basis.shape[1])), basis]).astype(np.float32)
    region = np.ones(shape, bool)
    volumes = output_volumes(out_shell, out_source, lambda t: b0[..., t].astype(np.float32), [flat],
                             s0.ravel(order="F").astype(np.float32), full_basis, shape, region,
                             np.arange(region.size))
    rebuilt = np.stack([np.array(v) for v in volumes], axis=-1)
    assert rebuilt.shape == shape + (n_out,)
    return rebuilt


@pytest.mark.parametrize("seed", range(5))
def test_rish_invariant_under_rotation_of_gradients(seed):
    rng = np.random.default_rng(seed)
    g = directions(60, seed)
    model = sh.SHModel(g, sh_order_max=4)
    coeffs = rng.normal(size=model.l_values.size)
    rotation = Rotation.random(random_state=seed).as_matrix()
    # f_R(g) = f(R^T g): the same band-limited function, rotated.
    signal_rotated = sh.sh_basis(g @ rotation, 4)[0] @ coeffs
    rish_rotated = sh.rish_features(signal_rotated[None] @ model.fit_matrix.T, model.l_values)[0]
    rish_true = sh.rish_features(coeffs[None].astype(np.float32), model.l_values)[0]
    np.testing.assert_allclose(rish_rotated, rish_true, rtol=1e-5)


def test_basis_is_orthonormal_on_the_sphere():
    sphere = Sphere(xyz=directions(400, 3))
    B, _, _ = sh.sh_basis(sphere.vertices, 4)
    gram = (B.T @ B) * (4 * np.pi / B.shape[0])  # quadrature on a near-uniform antipodal set
    np.testing.assert_allclose(gram, np.eye(B.shape[1]), atol=0.08)


def test_rish_order0_of_isotropic_signal_is_known():
    g = directions(30)
    signal = np.full((1, 30), 0.5)
    model = sh.SHModel(g)
    rish = sh.rish_features(signal @ model.fit_matrix.T, model.l_values)[0]
    # Y_00 = 1/sqrt(4 pi): C_00 = 0.5 sqrt(4 pi), RISH_0 = pi; higher orders vanish.
    np.testing.assert_allclose(rish, [np.pi, 0.0, 0.0], atol=1e-5)


def test_matches_dipy_sf_to_sh_unregularised():
    g = directions(64, 1)
    rng = np.random.default_rng(1)
    signal = np.stack([tensor_signal(g, rng.normal(size=3)) for _ in range(20)]).reshape(4, 5, 64)
    ours = signal @ sh.SHModel(g, 4).fit_matrix.T
    theirs = sf_to_sh(signal, Sphere(xyz=g), sh_order_max=4, basis_type="descoteaux07", legacy=False, smooth=0.0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_unit_scale_maps_reproduce_the_fitted_signal():
    g = directions(45, 2)
    signal = np.stack([tensor_signal(g, [1, 0.2, 0.1]), tensor_signal(g, [0, 1, 1])])
    model = sh.SHModel(g, 4)
    coeffs = (signal @ model.fit_matrix.T).astype(np.float32)
    scaled = sh.scale_sh(coeffs, np.ones((2, 3), np.float32), model.l_values)
    np.testing.assert_allclose(scaled @ model.basis.T, coeffs @ model.basis.T, rtol=1e-6)


def test_scale_maps_recover_known_ratio():
    src = np.array([[2.0, 0.5, 0.1]], np.float32)
    lam = np.array([[0.9, 0.8, 0.7]], np.float32)
    target = src * lam**2
    np.testing.assert_allclose(sh.scale_maps(target, src), lam, rtol=1e-5)
    coeffs = np.random.default_rng(0).normal(size=(1, 15)).astype(np.float32)
    l_values = sh.sh_basis(directions(20), 4)[2]
    rish_scaled = sh.rish_features(sh.scale_sh(coeffs, lam, l_values), l_values)
    np.testing.assert_allclose(rish_scaled, sh.rish_features(coeffs, l_values) * lam**2, rtol=1e-5)


def test_scaling_keeps_principal_direction_of_a_tensor():
    g = directions(64, 4)
    bvals = np.r_[0.0, np.full(64, 1000.0)]
    bvecs = np.vstack([[0, 0, 0], g])
    evecs = np.random.default_rng(4).normal(size=(3, 3))
    s0 = 1000.0
    data = np.stack([np.r_[s0, s0 * tensor_signal(g, e)] for e in evecs])[:, None, None, :]
    mask = np.ones(data.shape[:3], bool)
    model = sh.SHModel(g, 4)
    s0_map, coeffs = fit_shell_sh(data, np.array([0]), np.arange(1, 65), mask, model.fit_matrix)
    lam = np.broadcast_to(np.array([0.9, 0.75, 0.6], np.float32), data.shape[:3] + (3,))
    rebuilt = _rebuild(s0_map, data[..., :1], sh.scale_sh(coeffs, lam, model.l_values), model.basis)
    _, v_in = tensor_fit(data, bvals, bvecs, mask)
    _, v_out = tensor_fit(rebuilt, bvals, bvecs, mask)
    assert np.all(angular_error_deg(v_in, v_out) < 1.0)
    _, v_true = np.zeros(1), evecs / np.linalg.norm(evecs, axis=1, keepdims=True)
    assert np.all(angular_error_deg(v_out[:, 0, 0], v_true) < 2.0)


def normalised_fit(data, b0, dw, mask, fit_mat, s0_floor=1.0):
    """The fused fit's formula in memory: S0 = max(mean b0, floor), S/S0 clipped to [0, 1], SH
    least squares; zero outside ``mask``."""
    s0 = np.maximum(data[..., b0].mean(axis=-1), s0_floor)
    att = np.clip(data[..., dw] / s0[..., None], 0.0, 1.0)
    coeffs = att @ fit_mat.T
    return np.where(mask, s0, 0.0), np.where(mask[..., None], coeffs, 0.0)


def test_fused_fit_equals_normalise_then_fit():
    rng = np.random.default_rng(5)
    g = directions(30, 5)
    data = rng.uniform(0.2, 1000, size=(6, 5, 4, 33)).astype(np.float32)
    data[0, 0, 0, :3] = 0.5  # S0 below the floor
    mask = rng.uniform(size=(6, 5, 4)) > 0.3
    mask[0, 0, 0] = True
    b0, dw = np.arange(3), np.arange(3, 33)
    model = sh.SHModel(g, 4)
    s0_a, coeffs_a = normalised_fit(data.astype(np.float64), b0, dw, mask, model.fit_matrix)
    s0_b, coeffs_b = fit_shell_sh(data, b0, dw, mask, model.fit_matrix, chunk_voxels=11)
    np.testing.assert_allclose(s0_b, s0_a, rtol=1e-6)
    np.testing.assert_allclose(coeffs_b, coeffs_a, rtol=1e-5, atol=1e-6)
    assert s0_b[0, 0, 0] == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_fit_of_every_voxel_equals_the_masked_fit_and_leaves_the_data_alone(dtype):
    """A full mask takes the contiguous-slice path (views of the data, no gather): same result as
    the gathered path, and the caller's array is not modified in place."""
    rng = np.random.default_rng(6)
    g = directions(30, 6)
    data = rng.uniform(50, 1000, size=(6, 5, 4, 33)).astype(dtype)
    before = data.copy()
    model = sh.SHModel(g, 4)
    b0, dw = np.arange(3), np.arange(3, 33)
    full = np.ones(data.shape[:3], bool)
    almost = full.copy()
    almost[0, 0, 0] = False
    s0_a, coeffs_a = fit_shell_sh(data, b0, dw, full, model.fit_matrix, chunk_voxels=13)
    np.testing.assert_array_equal(data, before)
    s0_b, coeffs_b = fit_shell_sh(data, b0, dw, almost, model.fit_matrix, chunk_voxels=13)
    np.testing.assert_array_equal(s0_a[almost], s0_b[almost])
    np.testing.assert_allclose(coeffs_a[almost], coeffs_b[almost], rtol=1e-6, atol=1e-7)


def test_max_order_and_refusal():
    assert sh.max_sh_order(5) == 0 and sh.max_sh_order(6) == 2 and sh.max_sh_order(64) == 8
    with pytest.raises(ValueError, match="support SH order"):
        sh.SHModel(directions(10), sh_order_max=4)
    with pytest.raises(ValueError):
        sh.sh_basis(directions(10), 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_in_memory_and_streamed_eq3_agree(dtype):
    """Eq. 3 has one kernel: sh.scale_sh (in memory, the validation gate) and
    rebuild.scale_channels (streamed, the participant level) give the same coefficients to the
    bit, order 6 (no scale map) left unscaled, and the streamed RISH sums are Eq. 1 of both."""
    from bids_dmri_ldm.core.rebuild import scale_channels, sh_l_values

    rng = np.random.default_rng(3)
    l_values = sh_l_values(6)
    coeffs = rng.normal(size=(4, 5, 3, l_values.size)).astype(dtype)
    lam = rng.uniform(0.5, 1.5, size=(4, 5, 3, 3)).astype(np.float32)
    in_memory = sh.scale_sh(coeffs, lam, l_values, (0, 2, 4))
    rish_source, rish_predicted = np.zeros(lam.shape), np.zeros(lam.shape)
    channels = (coeffs[..., j].astype(np.float32) for j in range(l_values.size))
    streamed = np.stack(list(scale_channels(channels, l_values, lam, (0, 2, 4), rish_source, rish_predicted)), -1)
    assert in_memory.dtype == np.float32
    if dtype == np.float32:
        np.testing.assert_array_equal(in_memory, streamed)
    else:
        np.testing.assert_allclose(in_memory, streamed, rtol=1e-6)
    np.testing.assert_array_equal(in_memory[..., l_values == 6], coeffs[..., l_values == 6].astype(np.float32))
    np.testing.assert_allclose(in_memory[..., l_values == 2], coeffs[..., l_values == 2] * lam[..., 1:2], rtol=1e-6)
    np.testing.assert_allclose(rish_predicted, lam**2 * rish_source, rtol=1e-5)
    np.testing.assert_allclose(rish_source, sh.rish_features(coeffs, l_values)[..., :3], rtol=1e-5)


def test_scale_sh_with_one_lambda_per_order_broadcasts():
    """lambda of shape (n_orders,) scales every voxel alike, as before the kernel was shared."""
    l_values = sh.sh_basis(np.eye(3), 4)[2]
    coeffs = np.ones((2, 2, l_values.size), np.float32)
    scaled = sh.scale_sh(coeffs, np.array([1.0, 2.0, 3.0]), l_values)
    assert scaled.shape == coeffs.shape and scaled.dtype == np.float32
    np.testing.assert_array_equal(scaled[0, 0], np.where(l_values == 0, 1.0, np.where(l_values == 2, 2.0, 3.0)))

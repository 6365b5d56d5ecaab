"""Spatial scanner fields: gradient non-linearity (grad_dev) and the B1 transmit/receive/g-factor maps."""
import numpy as np
import pytest

from bids_dmri_ldm.simulate import acquisition as acq
from bids_dmri_ldm.simulate import fields

CENTRE = acq.WORLD_CENTRE_MM


def _points(n=200, radius=90.0, seed=0):
    rng = np.random.default_rng(seed)
    return CENTRE + rng.uniform(-radius, radius, (n, 3)) / np.sqrt(3.0)


def test_gradient_field_is_linear_at_the_isocentre_and_rolls_off_by_the_requested_b_drop():
    model = fields.GradientNonlinearity(b_drop=0.2)
    np.testing.assert_allclose(model.deviation(CENTRE, CENTRE), 0.0, atol=1e-15)
    r0 = fields.GRADIENT_REFERENCE_RADIUS_MM
    for axis in range(3):  # each coil along its own axis, 100 mm out: b drops by 20 %
        point = CENTRE + r0 * np.eye(3)[axis]
        bscale = fields.effective_bscale(model.deviation(point, CENTRE), np.eye(3)[axis : axis + 1])
        assert bscale[0] == pytest.approx(0.8, abs=1e-12)
    np.testing.assert_array_equal(fields.GradientNonlinearity().deviation(_points(), CENTRE), 0.0)


def test_each_coil_field_is_harmonic_and_its_deviation_grows_with_distance():
    """Column c of L is the gradient of coil c's field B_c, a solution of Laplace's equation: its
    divergence is zero and its Jacobian (the Hessian of B_c) is symmetric (central differences);
    the deviation grows as r^2 (order-3 harmonics)."""
    model = fields.GradientNonlinearity(b_drop=0.25, transverse_ratio=0.7)
    points = _points(50, seed=1)
    h = 1e-3
    # jacobian[p, i, c, k] = d L[i, c] / d x_k
    jacobian = np.stack(
        [(model.deviation(points + h * e, CENTRE) - model.deviation(points - h * e, CENTRE)) / (2 * h) for e in np.eye(3)], axis=-1
    )
    divergence = np.einsum("pici->pc", jacobian)
    np.testing.assert_allclose(divergence, 0.0, atol=1e-9)
    hessians = jacobian.transpose(0, 2, 1, 3)  # [p, c, i, k]
    np.testing.assert_allclose(hessians, hessians.transpose(0, 1, 3, 2), atol=1e-9)
    assert np.abs(hessians).max() > 1e-4  # not trivially zero
    direction = np.array([0.6, -0.3, 0.74])
    near, far = (np.linalg.norm(model.deviation(CENTRE + r * direction, CENTRE)) for r in (30.0, 90.0))
    assert far == pytest.approx(9.0 * near, rel=1e-9)


def test_default_3t_b_values_deviate_by_ten_to_twenty_percent_over_the_head():
    """Literature magnitude (HCP Connectom Skyra: gradient deviations up to ~15 %, Sotiropoulos 2013)."""
    model = fields.GradientNonlinearity(b_drop=0.2)
    rng = np.random.default_rng(2)
    head = CENTRE + rng.normal(0.0, 1.0, (4000, 3)) * np.array([55.0, 70.0, 55.0]) / 2.0
    head = head[np.sum(((head - CENTRE) / np.array([70.0, 90.0, 75.0])) ** 2, axis=1) < 1.0]  # ellipsoidal head
    directions = acq.electrostatic_directions(60, 3)
    bscale = fields.effective_bscale(model.deviation(head, CENTRE), directions)
    low, high = np.percentile(bscale, [0.5, 99.5])
    assert 0.75 < low < 0.92 and 1.08 < high < 1.25


def test_grad_dev_volumes_follow_the_fsl_convention_for_the_written_bvecs():
    """(I + L_vox) v with L_vox[i, j] = volume 3j+i, applied to the FSL bvec v of a world gradient g,
    is the bvec of (I + L_world) g: the simulated b and direction are recovered from the files."""
    model = fields.GradientNonlinearity(b_drop=0.3, transverse_ratio=1.3)
    points = _points(20, seed=3)
    deviation = model.deviation(points, CENTRE + np.array([3.0, -4.0, 6.0]))
    g = acq.electrostatic_directions(10, 4)
    for affine in (np.diag([-2.0, 2.0, 2.0, 1.0]), np.diag([2.0, -2.0, 2.0, 1.0]), np.diag([2.0, 2.0, 2.0, 1.0])):
        volumes = fields.grad_dev_volumes(deviation, affine)
        assert volumes.shape == (20, 9)
        l_vox = volumes.reshape(20, 3, 3).transpose(0, 2, 1)  # L[i, j] = volume 3 j + i
        v = acq.world_to_voxel_directions(g, affine).T  # (N, 3) FSL bvecs
        effective_vox = np.einsum("pij,nj->pni", np.eye(3) + l_vox, v)
        effective_world = np.einsum("pij,nj->pni", np.eye(3) + deviation, g)
        expected_vox = np.stack([acq.world_to_voxel_directions(e, affine).T for e in effective_world])
        np.testing.assert_allclose(effective_vox, expected_vox, atol=1e-12)
        np.testing.assert_allclose(np.sum(effective_vox**2, -1), fields.effective_bscale(deviation, g), atol=1e-12)


def test_isocentre_positioning_is_seeded_per_subject_and_session():
    model = fields.GradientNonlinearity(b_drop=0.2)
    a, b, c = model.isocentre(7, 30), model.isocentre(7, 30), model.isocentre(7, 70)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert np.all(np.abs(a - CENTRE) < 5 * np.array(model.isocentre_sd_mm))


def test_spin_echo_transmit_factor():
    np.testing.assert_allclose(fields.spin_echo_transmit_factor(np.array([1.0, 0.5, 0.0])), [1.0, np.sin(np.pi / 4) ** 3, 0.0], atol=1e-12)


def test_7t_b1_drops_in_temporal_lobes_and_cerebellum_and_snr_is_not_the_gain():
    b1 = fields.B1Field(fields.B1_7T, 1.0)
    centre, temporal_r, temporal_l, cerebellum = [0.0, -15.0, 20.0], [48.0, -12.0, -28.0], [-48.0, -12.0, -28.0], [0.0, -65.0, -42.0]
    gain, amplification = b1.maps(np.array([centre, temporal_r, temporal_l, cerebellum]))
    snr = gain / amplification
    assert gain[0] > 1.2 and 1.05 < snr[0] < 1.2  # central brightening, partly eaten by the g-factor
    assert np.all(snr[1:] < 0.6)  # temporal and cerebellar drop-out (spin echo: sin^3 of kappa ~0.55)
    assert amplification[0] > 1.1 and np.all(amplification[1:] < 1.05)
    flat_gain, flat_amp = fields.B1Field(fields.B1_7T, 0.0).maps(np.array([centre, temporal_r]))
    np.testing.assert_array_equal(flat_gain, 1.0)
    np.testing.assert_array_equal(flat_amp, 1.0)


def test_3t_receive_field_is_mild_and_brighter_at_the_cortex():
    gain, amplification = fields.B1Field(fields.B1_3T, 1.0).maps(np.array([CENTRE, CENTRE + [0.0, 0.0, 75.0]]))
    assert 0.85 < gain[0] < 0.95 and 1.0 < gain[1] < 1.15
    np.testing.assert_array_equal(amplification, 1.0)

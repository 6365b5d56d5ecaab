"""Rician noise (scalar and per-voxel SD)."""
import numpy as np
import pytest

from bids_dmri_ldm.simulate import noise


def test_rician_floor_of_zero_signal_is_rayleigh_mean():
    rng = np.random.default_rng(0)
    magnitude = noise.add_rician_noise(np.zeros(200_000, np.float32), 10.0, rng)
    assert magnitude.min() >= 0
    assert magnitude.mean() == pytest.approx(10.0 * np.sqrt(np.pi / 2), rel=0.01)


def test_rayleigh_shortcut_matches_two_normals_in_distribution():
    """Zero signal uses sigma*sqrt(-2 ln U); compare with explicit complex Gaussian magnitudes."""
    rng = np.random.default_rng(3)
    shortcut = np.sort(noise.add_rician_noise(np.zeros(100_000, np.float32), 5.0, rng))
    explicit = np.sort(np.abs(5.0 * (rng.standard_normal(100_000) + 1j * rng.standard_normal(100_000))))
    np.testing.assert_allclose(np.percentile(shortcut, [10, 50, 90, 99]), np.percentile(explicit, [10, 50, 90, 99]), rtol=0.03)


def test_rician_mean_power_is_signal_power_plus_two_sigma_squared():
    rng = np.random.default_rng(1)
    magnitude = noise.add_rician_noise(np.full(200_000, 50.0, np.float32), 10.0, rng)
    assert np.mean(magnitude.astype(np.float64) ** 2) == pytest.approx(50.0**2 + 2 * 10.0**2, rel=0.01)


def test_noise_sigma_and_measured_snr():
    sigma = noise.noise_sigma(0.3, 25.0, gain=1000.0)
    assert sigma == pytest.approx(12.0)
    rng = np.random.default_rng(2)
    b0 = noise.add_rician_noise(np.full((10, 10, 10, 18), 300.0, np.float32), sigma, rng)
    assert noise.measure_b0_snr(b0, np.ones((10, 10, 10), bool)) == pytest.approx(25.0, rel=0.05)
    with pytest.raises(ValueError):
        noise.noise_sigma(0.3, 0.0)


def test_per_voxel_sigma_map_scales_the_noise_of_each_voxel():
    """A sigma map broadcast over volumes: each voxel's Rayleigh floor and Rician power follow its own SD."""
    rng = np.random.default_rng(4)
    sigma = np.array([5.0, 20.0], np.float32)[:, None]  # (voxels, 1) broadcast over 50_000 volumes
    floor = noise.add_rician_noise(np.zeros((2, 50_000), np.float32), sigma, rng)
    np.testing.assert_allclose(floor.mean(axis=1), sigma[:, 0] * np.sqrt(np.pi / 2), rtol=0.02)
    signal = np.full((2, 50_000), 40.0, np.float32)
    power = np.mean(noise.add_rician_noise(signal, sigma, rng).astype(np.float64) ** 2, axis=1)
    np.testing.assert_allclose(power, 40.0**2 + 2 * sigma[:, 0] ** 2, rtol=0.02)


def test_int16_conversion_rounds_and_clips():
    np.testing.assert_array_equal(noise.to_int16(np.array([-3.0, 1.6, 2.4, 40000.0])), [0, 2, 2, 32767])

"""Thermal noise: complex Gaussian, magnitude kept (Rician).

The reference noise level of a protocol (``sigma0``) is set from the requested b0 SNR of pure white
matter at unit intensity gain: ``sigma0 = M0 * S_WM(b=0) / SNR``; the noise SD of a voxel is
``sigma0`` times the local noise amplification (g-factor, :mod:`.fields`). Noise is added to the
real and imaginary parts of the (real, phase-free) signal and the magnitude is kept, so
signal-free regions show the Rayleigh floor ``sigma * sqrt(pi / 2)`` (Gudbjartsson & Patz 1995).
"""
from __future__ import annotations

import numpy as np

SCANNER_GAIN = 10000.0
"""Intensity of fully relaxed tissue of unit proton density (arbitrary units; stored as int16)."""

INT16_MAX = 32767


def noise_sigma(white_matter_b0: float, snr: float, gain: float = SCANNER_GAIN) -> float:
    """Noise SD ``sigma0`` giving ``snr`` for pure white matter at b = 0 (unit gain, g-factor 1)."""
    if not snr > 0:
        raise ValueError(f"SNR must be positive, got {snr}")
    return gain * white_matter_b0 / snr


def add_rician_noise(signal: np.ndarray, sigma: float | np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``signal + sigma (n_re + i n_im)`` with standard normal ``n``.

    Where the signal is exactly 0 (outside the head) the magnitude is Rayleigh distributed and is
    drawn directly as ``sigma sqrt(-2 ln U)`` (one uniform instead of two normals: the same
    distribution, about half the cost on the ~55 % of a field of view that is background).

    Parameters
    ----------
    signal : ndarray, float32
        Noiseless (real, non-negative) signal.
    sigma : float or ndarray
        Noise SD, a scalar or an array broadcastable to ``signal`` (a per-voxel map).
    rng : numpy.random.Generator

    Returns
    -------
    ndarray, same shape, float32
    """
    signal = np.asarray(signal, dtype=np.float32)
    if np.ndim(sigma) > 0:
        # |s + sigma n| = sigma |s / sigma + n|: unit-SD noise on the scaled signal, then rescale
        # (two broadcast passes instead of gathering a full-size SD array by index).
        sigma = np.asarray(sigma, dtype=np.float32)
        out = _add_unit_rician_noise(signal / sigma, rng)
        out *= sigma
        return out
    out = _add_unit_rician_noise(signal * np.float32(1.0 / sigma), rng)
    out *= np.float32(sigma)
    return out


def _add_unit_rician_noise(signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``signal + n_re + i n_im`` (unit SD); ``signal`` float32, modified in place."""
    out = np.empty(signal.shape, dtype=np.float32)
    flat_in, flat_out = signal.reshape(-1), out.reshape(-1)
    has_signal = flat_in > 0
    inside = np.flatnonzero(has_signal)
    outside = np.flatnonzero(~has_signal)
    if outside.size:
        uniform = rng.random(outside.size, dtype=np.float32)
        np.subtract(1.0, uniform, out=uniform)  # (0, 1]: log is finite
        np.log(uniform, out=uniform)
        uniform *= np.float32(-2.0)
        flat_out[outside] = np.sqrt(uniform, out=uniform)
    if inside.size:
        real = rng.standard_normal(inside.size, dtype=np.float32)
        real += flat_in[inside]
        imag = rng.standard_normal(inside.size, dtype=np.float32)
        real *= real  # |z| = sqrt(re^2 + im^2), in place (np.hypot is several times slower)
        imag *= imag
        real += imag
        flat_out[inside] = np.sqrt(real, out=real)
    return out


def to_int16(values: np.ndarray) -> np.ndarray:
    """Round to the nearest integer and clip into int16 (as scanners store magnitude images)."""
    values = np.clip(values, 0.0, INT16_MAX, dtype=np.float32)
    values += np.float32(0.5)  # non-negative: truncation after +0.5 rounds half up
    return values.astype(np.int16)


def measure_b0_snr(b0_volumes: np.ndarray, mask: np.ndarray, gain: np.ndarray | None = None) -> float:
    """b0 SNR in ``mask``: mean signal over the pooled temporal SD of repeated b0 volumes.

    Parameters
    ----------
    b0_volumes : ndarray, shape (X, Y, Z, T)
        Repeated non-diffusion-weighted volumes (T >= 2).
    mask : ndarray of bool, shape (X, Y, Z)
    gain : ndarray, shape (X, Y, Z), optional
        Intensity gain; when given, the SNR is referred to unit gain (mean of signal / gain).
    """
    values = np.asarray(b0_volumes, dtype=np.float64)[mask]
    mean = values.mean(axis=1)
    sd = np.sqrt(np.mean(values.var(axis=1, ddof=1)))
    if gain is not None:
        mean = mean / np.asarray(gain, dtype=np.float64)[mask]
    return float(mean.mean() / sd)

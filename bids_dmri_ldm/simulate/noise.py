"""Thermal noise (complex Gaussian -> Rician magnitude) and the 7T receive/B1 field.

One noise level per protocol (``sigma``), set from the requested b0 SNR of pure white matter at
unit receive gain: ``sigma = M0 * S_WM(b=0) / SNR``. Noise is added to the real and imaginary
parts of the (real, phase-free) signal and the magnitude is kept, so signal-free regions show the
Rayleigh floor ``sigma * sqrt(pi / 2)`` (Gudbjartsson & Patz 1995).
"""
from __future__ import annotations

import numpy as np

SCANNER_GAIN = 10000.0
"""Intensity of fully relaxed tissue of unit proton density (arbitrary units; stored as int16)."""

INT16_MAX = 32767


def noise_sigma(white_matter_b0: float, snr: float, gain: float = SCANNER_GAIN) -> float:
    """Noise SD giving ``snr`` for pure white matter at b = 0 (unit receive gain)."""
    if not snr > 0:
        raise ValueError(f"SNR must be positive, got {snr}")
    return gain * white_matter_b0 / snr


def add_rician_noise(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``signal + sigma (n_re + i n_im)`` with standard normal ``n``.

    Where the signal is exactly 0 (outside the head) the magnitude is Rayleigh distributed and is
    drawn directly as ``sigma sqrt(-2 ln U)`` (one uniform instead of two normals: the same
    distribution, about half the cost on the ~55 % of a field of view that is background).

    Parameters
    ----------
    signal : ndarray, float32
        Noiseless (real, non-negative) signal.
    sigma : float
    rng : numpy.random.Generator

    Returns
    -------
    ndarray, same shape, float32
    """
    signal = np.asarray(signal, dtype=np.float32)
    out = np.empty(signal.shape, dtype=np.float32)
    flat_in, flat_out = signal.reshape(-1), out.reshape(-1)
    has_signal = flat_in > 0
    inside = np.flatnonzero(has_signal)
    outside = np.flatnonzero(~has_signal)
    if outside.size:
        uniform = rng.random(outside.size, dtype=np.float32)
        np.subtract(1.0, uniform, out=uniform)  # (0, 1]: log is finite
        np.log(uniform, out=uniform)
        uniform *= np.float32(-2.0 * sigma**2)
        flat_out[outside] = np.sqrt(uniform, out=uniform)
    if inside.size:
        real = rng.standard_normal(inside.size, dtype=np.float32)
        real *= np.float32(sigma)
        real += flat_in[inside]
        imag = rng.standard_normal(inside.size, dtype=np.float32)
        imag *= np.float32(sigma)
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


# Centres (world mm) and widths of the 7T receive/B1 field components: central brightening
# and signal loss in both temporal lobes and the cerebellum (the classic 7T pattern with a
# head transmit/receive array).
_FIELD_CENTRE = (np.array([0.0, -15.0, 20.0]), 55.0, 0.15)
_FIELD_DROPS = (
    (np.array([48.0, -12.0, -28.0]), 22.0, 0.45),
    (np.array([-48.0, -12.0, -28.0]), 22.0, 0.45),
    (np.array([0.0, -65.0, -42.0]), 25.0, 0.45),
)


def receive_field_7t(points: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Smooth multiplicative receive/B1 field at world points ``(..., 3)`` (mm).

    ``1 + 0.15 g_centre - 0.45 (g_temporal_L + g_temporal_R + g_cerebellum)`` with Gaussian bumps
    ``g`` (widths 22-55 mm), scaled by ``strength`` (0 gives a flat field of 1) and floored at
    0.2. About 1.15 in the centre of the brain, about 0.55-0.6 in the temporal poles and the
    cerebellum.
    """
    points = np.asarray(points, dtype=np.float64)

    def bump(centre: np.ndarray, width: float) -> np.ndarray:
        return np.exp(-np.sum((points - centre) ** 2, axis=-1) / (2.0 * width**2))

    centre, width, amplitude = _FIELD_CENTRE
    field = 1.0 + amplitude * bump(centre, width)
    for centre, width, amplitude in _FIELD_DROPS:
        field -= amplitude * bump(centre, width)
    field = 1.0 + strength * (field - 1.0)
    return np.maximum(field, 0.2).astype(np.float32)


def measure_b0_snr(b0_volumes: np.ndarray, mask: np.ndarray, gain: np.ndarray | None = None) -> float:
    """b0 SNR in ``mask``: mean signal over the pooled temporal SD of repeated b0 volumes.

    Parameters
    ----------
    b0_volumes : ndarray, shape (X, Y, Z, T)
        Repeated non-diffusion-weighted volumes (T >= 2).
    mask : ndarray of bool, shape (X, Y, Z)
    gain : ndarray, shape (X, Y, Z), optional
        Receive field; when given, the SNR is referred to unit gain (mean of signal / gain).
    """
    values = np.asarray(b0_volumes, dtype=np.float64)[mask]
    mean = values.mean(axis=1)
    sd = np.sqrt(np.mean(values.var(axis=1, ddof=1)))
    if gain is not None:
        mean = mean / np.asarray(gain, dtype=np.float64)[mask]
    return float(mean.mean() / sd)

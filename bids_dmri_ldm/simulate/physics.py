"""Physics presets of the simulator (``--physics default|shifted``).

A preset fixes, for each session, the protocol (voxel size, grid, echo time, gradient timing),
the T2 values, the b0 SNR, the gradient non-linearity and the B1 field; the tissue
diffusivities and the structural-disorder amplitude are shared by both sessions (same tissue).

- ``default``: HCP-like (table in docs/simulator.md). Train and evaluate on it.
- ``shifted``: other T2s, TEs, gradient timings, SNR, field maps and voxel sizes, each within
  published ranges, for *held-out evaluation only*: every fidelity number can be reported on a
  domain no model was trained on. Such a dataset says so in ``dataset_description.json`` (raw and
  ``derivatives/simulation``), under :data:`~bids_dmri_ldm.bidsio.heldout.PRESET_KEY`; :func:`~bids_dmri_ldm.bidsio.heldout.is_shifted_dataset`
  (also ``bids_dmri_ldm.simulate.is_shifted_dataset``) reads it.

Command-line options override single values of the preset (``--te-7t`` etc.).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .acquisition import PROTOCOL_3T, PROTOCOL_7T, Protocol
from .fields import B1_3T, B1_3T_SHIFTED, B1_7T, B1_7T_SHIFTED, B1Field, B1Pattern, GradientNonlinearity
from .signal import (
    DEFAULT_DISORDER_AMPLITUDE_UM2,
    T2_3T,
    T2_7T,
    Diffusivities,
    Relaxation,
    SignalModel,
    extra_perpendicular_at,
)


# Ranges accepted for user values (outside: a usage error). Wide enough for any real protocol,
# narrow enough to refuse typos and unit mistakes (seconds for ms, mm^2/s for um^2/ms).
ECHO_TIME_RANGE_MS = (20.0, 200.0)
SNR_RANGE = (1.0, 1000.0)
T2_RANGE_MS = (5.0, 5000.0)
DIFFUSIVITY_RANGE = (0.01e-3, 4.0e-3)  # mm^2/s; free water at 37 C is ~3.0e-3
GRADIENT_DROP_RANGE = (0.0, 0.5)
B1_STRENGTH_RANGE = (0.0, 1.5)
DISORDER_RANGE_UM2 = (0.0, 5.0)
TRACT_VARIATION_RANGE = (0.0, 2.0)


@dataclass(frozen=True)
class SessionPreset:
    """Preset values of one session.

    Attributes
    ----------
    protocol : Protocol
        Grid, echo time, gradient timing, gradient table and sidecar metadata.
    relaxation : Relaxation
    snr : float
        b0 SNR of pure white matter at unit intensity gain and unit noise amplification.
    gradient : GradientNonlinearity
    b1_pattern : B1Pattern
    b1_strength : float
    """

    protocol: Protocol
    relaxation: Relaxation
    snr: float
    gradient: GradientNonlinearity
    b1_pattern: B1Pattern
    b1_strength: float = 1.0


@dataclass(frozen=True)
class PhysicsPreset:
    """A named set of physics for both sessions."""

    name: str
    session_3t: SessionPreset
    session_7t: SessionPreset
    diffusivities: Diffusivities = Diffusivities(tract_variation=1.0)
    disorder_amplitude_um2: float = DEFAULT_DISORDER_AMPLITUDE_UM2

    def session(self, name: str) -> SessionPreset:
        return {"3T": self.session_3t, "7T": self.session_7t}[name]


DEFAULT = PhysicsPreset(
    name="default",
    session_3t=SessionPreset(PROTOCOL_3T, T2_3T, PROTOCOL_3T.snr_b0_wm, GradientNonlinearity(b_drop=0.2), B1_3T),
    # The 7T's whole-body SC72 gradient has a larger linear region than the 3T Connectom coil.
    session_7t=SessionPreset(PROTOCOL_7T, T2_7T, PROTOCOL_7T.snr_b0_wm, GradientNonlinearity(b_drop=0.08), B1_7T),
)

SHIFTED = PhysicsPreset(
    name="shifted",
    session_3t=SessionPreset(
        # 1.5 mm as in the HCP Lifespan protocols; TE 80 ms and (Delta, delta) 38/13 ms are feasible
        # for b 3000 on a 100 mT/m gradient.
        replace(PROTOCOL_3T, voxel_mm=1.5, shape=(121, 145, 121), echo_time_ms=80.0, big_delta_ms=38.0, small_delta_ms=13.0),
        # 3T WM T2 69-80 ms, GM 80-110 ms, CSF 1.5-2 s (Stanisz et al. 2005; Wansapura et al. 1999);
        # intra- vs extra-axonal split within McKinnon & Jensen 2019's range.
        Relaxation(intra=88.0, extra=58.0, grey_matter=85.0, csf=1600.0),
        20.0,
        GradientNonlinearity(b_drop=0.28, transverse_ratio=0.7, isocentre_offset_mm=(0.0, 5.0, -10.0)),
        B1_3T_SHIFTED,
    ),
    session_7t=SessionPreset(
        # 1.25 mm, TE 60 ms with (Delta, delta) 28.5/16 ms: b 2000 on 70 mT/m.
        replace(PROTOCOL_7T, voxel_mm=1.25, shape=(145, 174, 145), echo_time_ms=60.0, big_delta_ms=28.5, small_delta_ms=16.0),
        # 7T WM T2 45-55 ms, GM 47-60 ms, CSF 0.7-1.1 s (Cox & Gowland 2010; Wiggermann et al. 2021).
        Relaxation(intra=52.0, extra=42.0, grey_matter=55.0, csf=800.0),
        20.0,
        GradientNonlinearity(b_drop=0.12, transverse_ratio=1.2, isocentre_offset_mm=(0.0, -5.0, 5.0)),
        B1_7T_SHIFTED,
    ),
)

PRESETS = {preset.name: preset for preset in (DEFAULT, SHIFTED)}


@dataclass(frozen=True)
class ScanPhysics:
    """Everything one simulated scan needs besides the anatomy (picklable, validated).

    Attributes
    ----------
    protocol : Protocol
        With the echo time and gradient timing actually used (the sidecar reports them).
    model : SignalModel
        Echo time, T2 values, diffusivities (``extra_perpendicular`` at this protocol's timing).
    snr : float
    gradient : GradientNonlinearity
    b1 : B1Field
    """

    protocol: Protocol
    model: SignalModel
    snr: float
    gradient: GradientNonlinearity
    b1: B1Field

    @property
    def session(self) -> str:
        return self.protocol.name

    def provenance(self) -> dict:
        """Parameters recorded in the truth sidecars."""
        return {
            "EchoTimeMs": self.model.echo_time_ms,
            "GradientTimingMs": {"Delta": self.protocol.big_delta_ms, "delta": self.protocol.small_delta_ms},
            "T2Ms": vars(self.model.relaxation),
            "DiffusivitiesMm2PerS": vars(self.model.diffusivities),
            "SNRb0WhiteMatter": self.snr,
            "VoxelSizeMmAtScale1": self.protocol.voxel_mm,
            "GradientNonlinearityBDrop": self.gradient.b_drop,
            "B1FieldStrength": self.b1.strength,
        }


def build_scan_physics(
    preset: PhysicsPreset,
    session: str,
    *,
    echo_time_ms: float | None = None,
    timing_ms: tuple[float, float] | None = None,
    relaxation: Relaxation | None = None,
    snr: float | None = None,
    gradient_drop: float | None = None,
    b1_strength: float | None = None,
    diffusivities: Diffusivities | None = None,
    disorder_amplitude_um2: float | None = None,
    tract_variation: float | None = None,
) -> ScanPhysics:
    """The physics of one session: the preset's values, with any given value replacing it.

    Raises ``ValueError`` (one line, naming the option) when a value is out of range.
    """
    values = preset.session(session)
    protocol = values.protocol
    if echo_time_ms is not None:
        protocol = replace(protocol, echo_time_ms=echo_time_ms)
    if timing_ms is not None:
        protocol = replace(protocol, big_delta_ms=timing_ms[0], small_delta_ms=timing_ms[1])
    relaxation = relaxation or values.relaxation
    diffusivities = diffusivities or preset.diffusivities
    if tract_variation is not None:
        diffusivities = replace(diffusivities, tract_variation=tract_variation)
    amplitude = preset.disorder_amplitude_um2 if disorder_amplitude_um2 is None else disorder_amplitude_um2
    suffix = session.lower()
    _check_range(f"--te-{suffix}", protocol.echo_time_ms, ECHO_TIME_RANGE_MS, "ms")
    _check_timing(suffix, protocol)
    for name, value in vars(relaxation).items():
        _check_range(f"--t2-{suffix} ({name})", value, T2_RANGE_MS, "ms")
    for name in ("intra", "extra_parallel", "extra_perpendicular", "grey_matter", "csf"):
        _check_range(f"--diffusivities ({name})", getattr(diffusivities, name) * 1e3, tuple(v * 1e3 for v in DIFFUSIVITY_RANGE), "um^2/ms")
    if not 0.0 <= diffusivities.intra_fraction <= 1.0:
        raise ValueError(f"--intra-fraction must be between 0 and 1, got {diffusivities.intra_fraction}")
    _check_range("--tract-variation", diffusivities.tract_variation, TRACT_VARIATION_RANGE, "")
    _check_range("--time-dependence", amplitude, DISORDER_RANGE_UM2, "um^2")
    d_perp = extra_perpendicular_at(diffusivities.extra_perpendicular, amplitude, (protocol.big_delta_ms, protocol.small_delta_ms))
    if not d_perp > 0.0:
        raise ValueError(
            f"--time-dependence {amplitude:g} makes the {session} extra-axonal perpendicular diffusivity "
            f"{d_perp * 1e3:.3f} um^2/ms at Delta/delta {protocol.big_delta_ms:g}/{protocol.small_delta_ms:g} ms; it must stay positive"
        )
    snr = values.snr if snr is None else snr
    _check_range(f"--snr-{suffix}", snr, SNR_RANGE, "")
    gradient = values.gradient if gradient_drop is None else replace(values.gradient, b_drop=gradient_drop)
    _check_range(f"--grad-nonlin-{suffix}", gradient.b_drop, GRADIENT_DROP_RANGE, "")
    strength = values.b1_strength if b1_strength is None else b1_strength
    _check_range(f"--b1-field-{suffix}", strength, B1_STRENGTH_RANGE, "")
    model = SignalModel(protocol.echo_time_ms, relaxation, replace(diffusivities, extra_perpendicular=d_perp))
    return ScanPhysics(protocol=protocol, model=model, snr=snr, gradient=gradient, b1=B1Field(values.b1_pattern, strength))


def _check_range(option: str, value: float, bounds: tuple[float, float], unit: str) -> None:
    low, high = bounds
    if not (math.isfinite(value) and low <= value <= high):
        unit = f" {unit}" if unit else ""
        raise ValueError(f"{option} must be between {low:g} and {high:g}{unit}, got {value:g}")


def _check_timing(suffix: str, protocol: Protocol) -> None:
    big, small, te = protocol.big_delta_ms, protocol.small_delta_ms, protocol.echo_time_ms
    if not (math.isfinite(big) and math.isfinite(small) and 0.0 < small < big):
        raise ValueError(f"--timing-{suffix} needs 0 < delta < Delta, got Delta {big:g} ms, delta {small:g} ms")
    if big + small >= te:
        raise ValueError(
            f"--timing-{suffix} / --te-{suffix}: Delta + delta ({big + small:g} ms) must be shorter than the echo time ({te:g} ms)"
        )

r"""Multi-compartment diffusion signal with echo-time (T2) weighting of each compartment.

Model (per unit proton density, all compartments with the same proton density; TR effects
neglected, TR >> T1 in these protocols except for CSF)::

    S(b, g) = f_WM  sum_k p_k [ f_in  e^{-TE/T2_in} e^{-b D_in (g.n_k)^2}
                               + (1 - f_in) e^{-TE/T2_ex} e^{-b (D_perp + (D_par - D_perp)(g.n_k)^2)} ]
            + f_GM  e^{-TE/T2_GM}  e^{-b D_GM}
            + f_CSF e^{-TE/T2_CSF} e^{-b D_CSF}

``f_*``: tissue volume fractions, ``p_k`` / ``n_k``: fraction and unit direction of fibre
population ``k``, ``f_in``: intra-axonal signal fraction. Stick (intra-axonal) and zeppelin
(extra-axonal) as in Panagiotaki et al. 2012. Because the echo time re-weights the compartments,
S/S0 differs between 3T (TE 89.5 ms) and 7T (TE 71.2 ms) even for the same tissue: this is what
makes the 7T/3T RISH ratios of ``../shared/science.md`` (pure WM L0 0.89, L2 0.83, L4 0.77).

Diffusion time: the extra-axonal perpendicular diffusivity depends on the gradient timing through
structural disorder of the axon packing (2-D short-range disorder, Burcaw, Fieremans & Novikov
2015; observed in vivo in human WM by Fieremans et al. 2016). For a pulsed-gradient spin echo

.. math:: D_\perp(\Delta, \delta) = D_\infty + A \, \frac{\ln(\Delta/\delta) + 3/2}{\Delta - \delta/3},

so with ``D_perp`` given at a reference timing (HCP 3T: Delta 43.1 ms, delta 10.6 ms) a protocol with
another timing gets ``D_perp + A (phi(timing) - phi(reference))`` (:func:`extra_perpendicular_at`).

Gradient non-linearity (:mod:`.fields`): a voxel with gradient deviation tensor ``L`` sees the
nominal direction ``g`` as ``(I + L) g``: ``b (n.g)^2`` becomes ``b ((I + L)^T n . g)^2`` and the
isotropic terms ``b D`` become ``b D |(I + L) g|^2`` (:func:`fibre_signal`, :func:`mixture_signal`).

Units: b in s/mm^2, diffusivities in mm^2/s (2.2 um^2/ms = 2.2e-3 mm^2/s), times in ms.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .fields import effective_bscale

B0_THRESHOLD = 50.0
"""Volumes with b <= this are non-diffusion-weighted (simulated at b = 0)."""


@dataclass(frozen=True)
class Diffusivities:
    """Compartment diffusivities (mm^2/s) and the intra-axonal signal fraction.

    ``tract_variation`` scales the tract-specific offsets of the intra-axonal fraction
    (:data:`TRACT_INTRA_FRACTION_OFFSETS`; 0: the same ``intra_fraction`` in every fibre population).
    """

    intra: float = 2.2e-3
    extra_parallel: float = 2.0e-3
    extra_perpendicular: float = 0.7e-3
    grey_matter: float = 0.9e-3
    csf: float = 3.0e-3
    intra_fraction: float = 0.55
    tract_variation: float = 0.0


@dataclass(frozen=True)
class Relaxation:
    """Compartment T2 values (ms) at one field strength."""

    intra: float
    extra: float
    grey_matter: float
    csf: float


T2_3T = Relaxation(intra=80.0, extra=55.0, grey_matter=76.0, csf=2000.0)
"""3T: intra-axonal T2 longer than extra-axonal (McKinnon & Jensen 2019); WM ~71, GM 76 ms."""

T2_7T = Relaxation(intra=47.0, extra=47.0, grey_matter=47.0, csf=1000.0)
"""7T: WM and GM ~47 ms (Cox & Gowland 2010), CSF ~1 s."""

TRACT_INTRA_FRACTION_OFFSETS = {
    "CC": 0.07, "CST": 0.05, "MCP": 0.05, "CG": 0.0, "SLF": -0.02, "AF": -0.02, "IFOF": -0.03, "background": -0.06,
}
"""Intra-axonal fraction of each tract relative to ``intra_fraction`` (bundle-name prefixes of
:data:`.fibres.BUNDLE_NAMES`). Illustrative values spanning the ~0.45-0.7 range of intra-axonal /
intra-neurite fractions that NODDI and WMTI studies report across adult WM (densely packed
commissural and projection fibres highest, peripheral WM lowest); they make the TE re-weighting,
and so the 7T/3T ratios, differ between tracts."""


def tract_intra_fractions(diffusivities: Diffusivities, names: tuple[str, ...] | None = None) -> np.ndarray:
    """Intra-axonal fraction of each fibre population ``(len(names),)``, clipped to [0.05, 0.95]."""
    from .fibres import BUNDLE_NAMES

    names = BUNDLE_NAMES if names is None else names
    offsets = []
    for name in names:
        prefix = next(key for key in sorted(TRACT_INTRA_FRACTION_OFFSETS, key=len, reverse=True) if name.startswith(key))
        offsets.append(TRACT_INTRA_FRACTION_OFFSETS[prefix])
    fractions = diffusivities.intra_fraction + diffusivities.tract_variation * np.asarray(offsets)
    return np.clip(fractions, 0.05, 0.95)


REFERENCE_TIMING_MS = (43.1, 10.6)
"""(Delta, delta) at which :attr:`Diffusivities.extra_perpendicular` is given: the HCP 3T protocol."""

DEFAULT_DISORDER_AMPLITUDE_UM2 = 1.0
"""``A`` of the extra-axonal structural-disorder term (um^2): the order of magnitude fitted to the
radial diffusivity of human WM in vivo (Fieremans et al. 2016). With the HCP timings it moves
``D_perp`` by ~1 % between 3T and 7T."""


def disorder_time_factor(big_delta_ms: float, small_delta_ms: float) -> float:
    """``(ln(Delta/delta) + 3/2) / (Delta - delta/3)`` (1/ms) of a pulsed-gradient spin echo."""
    return (np.log(big_delta_ms / small_delta_ms) + 1.5) / (big_delta_ms - small_delta_ms / 3.0)


def extra_perpendicular_at(
    d_perp_reference: float,
    amplitude_um2: float,
    timing_ms: tuple[float, float],
    reference_ms: tuple[float, float] = REFERENCE_TIMING_MS,
) -> float:
    """Extra-axonal perpendicular diffusivity (mm^2/s) at gradient timing ``(Delta, delta)`` (ms).

    Parameters
    ----------
    d_perp_reference : float
        ``D_perp`` (mm^2/s) at ``reference_ms``.
    amplitude_um2 : float
        Disorder amplitude ``A`` (um^2; 0: no time dependence).
    timing_ms, reference_ms : tuple of 2 float
        ``(Delta, delta)`` in ms.
    """
    change = amplitude_um2 * (disorder_time_factor(*timing_ms) - disorder_time_factor(*reference_ms))
    return d_perp_reference + 1e-3 * change  # um^2/ms = 1e-3 mm^2/s


@dataclass(frozen=True)
class SignalModel:
    """Everything that fixes the noiseless signal of a tissue mixture for one protocol.

    Attributes
    ----------
    echo_time_ms : float
    relaxation : Relaxation
    diffusivities : Diffusivities
    """

    echo_time_ms: float
    relaxation: Relaxation
    diffusivities: Diffusivities = Diffusivities()

    def with_echo_time(self, echo_time_ms: float) -> SignalModel:
        return replace(self, echo_time_ms=echo_time_ms)

    @property
    def weights(self) -> dict[str, float]:
        """b = 0 signal of each compartment per unit volume: ``e^{-TE/T2}`` (WM split in/ex)."""
        te, t2, f_in = self.echo_time_ms, self.relaxation, self.diffusivities.intra_fraction
        return {
            "intra": f_in * float(np.exp(-te / t2.intra)),
            "extra": (1.0 - f_in) * float(np.exp(-te / t2.extra)),
            "grey_matter": float(np.exp(-te / t2.grey_matter)),
            "csf": float(np.exp(-te / t2.csf)),
        }

    @property
    def white_matter_b0(self) -> float:
        """b = 0 signal of pure white matter per unit proton density."""
        w = self.weights
        return w["intra"] + w["extra"]


def physical_bvals(bvals: np.ndarray) -> np.ndarray:
    """b-values used for the physics: b0 volumes (b <= 50, written as 5) are simulated at 0."""
    bvals = np.asarray(bvals, dtype=np.float64)
    return np.where(bvals <= B0_THRESHOLD, 0.0, bvals)


def fibre_signal(
    model: SignalModel,
    bvals: np.ndarray,
    cos2: np.ndarray,
    perpendicular: np.ndarray | None = None,
    intra_fraction: np.ndarray | None = None,
) -> np.ndarray:
    """Stick + zeppelin signal of one fibre population.

    Parameters
    ----------
    model : SignalModel
    bvals : ndarray, shape (N,)
        Physical b-values (s/mm^2).
    cos2 : ndarray, shape (..., N)
        ``(n.g)^2`` for unit gradients ``g``; under gradient non-linearity ``((I + L)^T n . g)^2``.
    perpendicular : ndarray, shape (N,) or (..., N), optional
        The extra-axonal factor ``exp(-b D_perp |(I + L) g|^2)``; default ``exp(-b D_perp)``
        (linear gradients).
    intra_fraction : ndarray, shape (P,), optional
        Intra-axonal fraction of each row of a ``(P, N)`` ``cos2`` (tract-specific); default the
        model's ``intra_fraction``.

    Returns
    -------
    ndarray, shape (..., N), float32
        ``w_in exp(-b D_in cos2) + w_ex exp(-b (D_par - D_perp) cos2) perpendicular`` per unit WM
        volume (b = 0 value: ``model.white_matter_b0``).
    """
    d, w = model.diffusivities, model.weights
    b = np.asarray(bvals, dtype=np.float64)
    cos2 = np.asarray(cos2, dtype=np.float32)
    # In-place float32 passes: this is the simulator's innermost loop.
    intra = cos2 * (-b * d.intra).astype(np.float32)
    np.exp(intra, out=intra)
    extra = cos2 * (-b * (d.extra_parallel - d.extra_perpendicular)).astype(np.float32)
    np.exp(extra, out=extra)
    if intra_fraction is None:
        w_intra, w_extra = np.float32(w["intra"]), np.float32(w["extra"])
    else:
        relax = model.relaxation
        f = np.asarray(intra_fraction, dtype=np.float32)[:, None]
        w_intra = f * np.float32(np.exp(-model.echo_time_ms / relax.intra))
        w_extra = (1.0 - f) * np.float32(np.exp(-model.echo_time_ms / relax.extra))
    if perpendicular is None:
        extra *= np.exp(-b * d.extra_perpendicular).astype(np.float32)
    else:
        extra *= perpendicular
    extra *= w_extra
    intra *= w_intra
    intra += extra
    return intra


def isotropic_signals(model: SignalModel, bvals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grey-matter and CSF signals per unit volume at physical b-values.

    ``bvals`` may be ``(N,)`` or per voxel ``(V, N)`` (``b |(I + L) g|^2`` under gradient
    non-linearity); the outputs have its shape, float32.
    """
    d, w = model.diffusivities, model.weights
    b = np.asarray(bvals, dtype=np.float32)
    gm = b * np.float32(-d.grey_matter)
    np.exp(gm, out=gm)
    gm *= np.float32(w["grey_matter"])
    csf = b * np.float32(-d.csf)
    np.exp(csf, out=csf)
    csf *= np.float32(w["csf"])
    return gm, csf


def mixture_signal(
    model: SignalModel,
    bvals: np.ndarray,
    gradients: np.ndarray,
    tissue: np.ndarray,
    fibre_fractions: np.ndarray,
    fibre_directions: np.ndarray,
    deviation: np.ndarray | None = None,
) -> np.ndarray:
    """Noiseless signal of voxels holding one tissue mixture each (no partial-volume averaging).

    Parameters
    ----------
    model : SignalModel
    bvals : ndarray, shape (N,)
        b-values as written (b <= 50 simulated at 0).
    gradients : ndarray, shape (N, 3)
        Unit gradient directions (same frame as ``fibre_directions``).
    tissue : ndarray, shape (V, 3)
        WM, GM, CSF fractions.
    fibre_fractions : ndarray, shape (V, K)
        Fibre population fractions within WM (summing to 1).
    fibre_directions : ndarray, shape (V, K, 3)
        Unit fibre directions.
    deviation : ndarray, shape (V, 3, 3), optional
        Gradient deviation tensor ``L`` of each voxel (same frame as ``gradients``); None: linear.

    Returns
    -------
    ndarray, shape (V, N), float32
        Signal per unit proton density.
    """
    b = physical_bvals(bvals)
    directions = np.asarray(fibre_directions, np.float64)
    tissue = np.asarray(tissue, np.float32)
    if deviation is None:
        bscale = np.ones((tissue.shape[0], b.size))
    else:
        bscale = effective_bscale(deviation, np.asarray(gradients, np.float64))
        directions = np.einsum("vkc,vcd->vkd", directions, np.eye(3) + deviation)  # (I + L)^T n
    cos2 = np.einsum("vkc,nc->vkn", directions, np.asarray(gradients, np.float64)) ** 2
    perpendicular = np.exp(-b * model.diffusivities.extra_perpendicular * bscale).astype(np.float32)
    fibre = fibre_signal(model, b, cos2, perpendicular[:, None, :])
    wm = np.einsum("vk,vkn->vn", np.asarray(fibre_fractions, np.float32), fibre)
    gm, csf = isotropic_signals(model, b * bscale)
    return tissue[:, :1] * wm + tissue[:, 1:2] * gm + tissue[:, 2:3] * csf

"""Multi-compartment diffusion signal with echo-time (T2) weighting of each compartment.

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

Units: b in s/mm^2, diffusivities in mm^2/s (2.2 um^2/ms = 2.2e-3 mm^2/s), times in ms.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

B0_THRESHOLD = 50.0
"""Volumes with b <= this are non-diffusion-weighted (simulated at b = 0)."""


@dataclass(frozen=True)
class Diffusivities:
    """Compartment diffusivities (mm^2/s) and the intra-axonal signal fraction."""

    intra: float = 2.2e-3
    extra_parallel: float = 2.0e-3
    extra_perpendicular: float = 0.7e-3
    grey_matter: float = 0.9e-3
    csf: float = 3.0e-3
    intra_fraction: float = 0.55


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


def fibre_signal(model: SignalModel, bvals: np.ndarray, cos2: np.ndarray) -> np.ndarray:
    """Stick + zeppelin signal of one fibre population.

    Parameters
    ----------
    model : SignalModel
    bvals : ndarray, shape (N,)
        Physical b-values (s/mm^2).
    cos2 : ndarray, shape (..., N)
        Squared cosine between the gradient and the fibre direction.

    Returns
    -------
    ndarray, shape (..., N), float32
        Signal per unit WM volume (b = 0 value: ``model.white_matter_b0``).
    """
    d, w = model.diffusivities, model.weights
    b = np.asarray(bvals, dtype=np.float64)
    cos2 = np.asarray(cos2, dtype=np.float32)
    # In-place float32 passes: this is the simulator's innermost loop.
    intra = cos2 * (-b * d.intra).astype(np.float32)
    np.exp(intra, out=intra)
    extra = cos2 * (-b * (d.extra_parallel - d.extra_perpendicular)).astype(np.float32)
    np.exp(extra, out=extra)
    extra *= (w["extra"] * np.exp(-b * d.extra_perpendicular)).astype(np.float32)
    intra *= np.float32(w["intra"])
    intra += extra
    return intra


def isotropic_signals(model: SignalModel, bvals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grey-matter and CSF signals ``(N,)`` per unit volume at physical b-values ``(N,)``."""
    d, w = model.diffusivities, model.weights
    b = np.asarray(bvals, dtype=np.float64)
    return (w["grey_matter"] * np.exp(-b * d.grey_matter)).astype(np.float32), (w["csf"] * np.exp(-b * d.csf)).astype(np.float32)


def mixture_signal(
    model: SignalModel,
    bvals: np.ndarray,
    gradients: np.ndarray,
    tissue: np.ndarray,
    fibre_fractions: np.ndarray,
    fibre_directions: np.ndarray,
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

    Returns
    -------
    ndarray, shape (V, N), float32
        Signal per unit proton density.
    """
    b = physical_bvals(bvals)
    cos2 = np.einsum("vkc,nc->vkn", np.asarray(fibre_directions, np.float32), np.asarray(gradients, np.float32)) ** 2
    wm = np.einsum("vk,vkn->vn", np.asarray(fibre_fractions, np.float32), fibre_signal(model, b, cos2))
    gm, csf = isotropic_signals(model, b)
    tissue = np.asarray(tissue, np.float32)
    return tissue[:, :1] * wm + tissue[:, 1:2] * gm + tissue[:, 2:3] * csf

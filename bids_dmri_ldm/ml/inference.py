"""Participant-level translation of 3T RISH maps to 7T-like RISH maps (arrays in, arrays out).

Pipeline (Zhu et al., MICCAI 2024, Sec. 2): normalise per order -> crop to the
brain and resize to the model grid -> 3T VQ-VAE encoder -> deterministic DDIM
inversion to t0 (Eq. 8) -> classifier-free-guided DDIM sampling toward the 7T
class (Eq. 10) -> 7T VQ-VAE decoder -> super-resolution head -> back to the
input grid -> denormalise.  The three RISH orders (and the K samples) travel as
one batch, each order with its own t0 and omega.

The same 3T RISH is also passed through the 3T encode/decode path and returned
as ``recon_3t``: scale maps lambda = sqrt(pred_7t / recon_3t) then cancel the
autoencoder's own error (issue option (ii)).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from ..vocabulary import PRECISIONS
from .bundle import Bundle
from .data import denormalised_from_model_grid, to_model_grid
from .diffusion import LatentDiffusion
from .modelconfig import CLASS_7T, CLASS_NAMES
from .normalise import normalise


class Translation(NamedTuple):
    """Result of :func:`translate_rish` (unpacks as a 4-tuple)."""

    pred_7t: np.ndarray          # (X, Y, Z, n_orders) float32, mean over samples
    std: np.ndarray | None       # (X, Y, Z, n_orders) float32 or None when num_samples == 1
    recon_3t: np.ndarray         # (X, Y, Z, n_orders) float32, 3T encode/decode round trip
    provenance: dict[str, Any]


def mixed_precision_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (:data:`PRECISIONS`), None for float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32" or (device.type != "cuda" and precision == "auto"):
        return None
    if device.type == "cuda" and precision == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def cpu_computes_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has native bfloat16 arithmetic (the ``avx512_bf16`` or ``amx_bf16`` flag).

    Read from the kernel's CPU flags because torch has no public query, and oneDNN's own check
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) also accepts plain AVX-512, where bfloat16
    is emulated and slower than float32.  False where the flags cannot be read (not Linux).
    """
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.partition(":")[2].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(config: dict[str, Any], device: torch.device, precision: str = "auto") -> str:
    """The precision a bundle runs with: ``auto`` on the CPU becomes the config's
    ``translation.cpu_precision`` (default ``fp32``) where the CPU computes bfloat16 natively
    (:func:`cpu_computes_bfloat16`), else ``fp32``; any other choice, or any device but the CPU,
    is returned unchanged.

    Per bundle because it pays only for large grids: on the 2-core AVX512-BF16 VM the ``paper``
    translation (96^3, 50 + 50 DDIM steps) took 43-50 s in bfloat16 against 78-84 s in float32,
    the ``demo`` one (32^3) 2.4 s against 1.4 s (docs/performance.md).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto" or device.type != "cpu":
        return precision
    wanted = config.get("translation", {}).get("cpu_precision", "fp32")
    return "bf16" if wanted == "bf16" and cpu_computes_bfloat16() else "fp32"


def precision_provenance(device: torch.device, precision: str = "auto") -> dict[str, Any]:
    """Sidecar record of the arithmetic :func:`autocast_for` uses: ``MixedPrecision`` (bool) and
    ``Precision`` (``"float32"`` or e.g. ``"bfloat16 autocast"``)."""
    dtype = mixed_precision_dtype(device, precision)
    return {"MixedPrecision": dtype is not None,
            "Precision": "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"}


def autocast_for(device: torch.device, enabled: bool = True, precision: str = "auto"):
    """Autocast context of ``precision`` on ``device`` (:func:`mixed_precision_dtype`); a no-op
    when that is float32 or when not ``enabled``."""
    dtype = mixed_precision_dtype(device, precision) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _per_order(value: Sequence[float] | float | None, default: Sequence[float], n: int,
               name: str) -> list[float]:
    if value is None:
        return list(default)
    if np.isscalar(value):
        return [float(value)] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} needs 1 or {n} values (one per RISH order), got {len(value)}")
    return value


def encode(bundle: Bundle, x: torch.Tensor, which: str, device: torch.device,
           precision: str = "auto") -> torch.Tensor:
    """Quantised latent of model-grid volumes (N, 1, *grid), times the latent scale."""
    vq = bundle.networks[which]
    with autocast_for(device, precision=precision):
        z = vq.encode(x.to(device))
    z, _ = vq.quantize(z.float())
    return z * bundle.config["latent_scale"]


def decode(bundle: Bundle, z: torch.Tensor, which: str, device: torch.device,
           precision: str = "auto") -> torch.Tensor:
    """Model-grid volumes (N, 1, *grid) from scaled latents; optional re-quantisation."""
    vq = bundle.networks[which]
    z = z / bundle.config["latent_scale"]
    if bundle.config["translation"]["requantise"]:
        z, _ = vq.quantize(z)
    with autocast_for(device, precision=precision):
        return vq.decode(z).float()


def translate_latents(bundle: Bundle, z3: torch.Tensor, t0: Sequence[int], guidance: Sequence[float],
                      ddim_steps: int, device: torch.device, eta: float = 0.0,
                      generator: torch.Generator | Sequence[torch.Generator] | None = None,
                      precision: str = "auto") -> torch.Tensor:
    """3T latents (N, C, ...) -> 7T latents: DDIM inversion to t0 then guided sampling.

    ``t0``/``guidance`` are per batch entry (N values).
    """
    cfg = bundle.config
    diffusion = LatentDiffusion.from_config(cfg)
    unet = bundle.networks["unet"]
    n = len(z3)
    t0_t = torch.as_tensor(t0, dtype=torch.long)
    invert_labels = torch.full((n,), CLASS_NAMES[cfg["translation"]["invert_class"]],
                               dtype=torch.long, device=device)
    target_labels = torch.full((n,), CLASS_7T, dtype=torch.long, device=device)
    w = torch.as_tensor(guidance, dtype=torch.float32, device=device)

    def model(x, t, labels):
        with autocast_for(device, precision=precision):
            return unet(x, t, labels)

    with torch.no_grad():
        x_t0 = diffusion.invert(model, z3.to(device), t0_t, ddim_steps, invert_labels)  # Eq. 8
        return diffusion.sample(model, x_t0, t0_t, ddim_steps, target_labels, w,       # Eq. 10
                                eta=eta, generator=generator)


class DeviceMemoryError(RuntimeError):
    """The accelerator ran out of memory; the message says what to reduce."""


def translate_rish(rish_3t: np.ndarray, mask: np.ndarray, bundle: Bundle,
                   device: torch.device | str = "cpu", seed: int | None = None,
                   num_samples: int | None = None, t0: Sequence[int] | int | None = None,
                   guidance: Sequence[float] | float | None = None,
                   ddim_steps: int | None = None, max_batch: int = 12,
                   precision: str = "auto") -> Translation:
    """Predict 7T-like RISH maps from 3T RISH maps with the latent diffusion model.

    Parameters
    ----------
    rish_3t : (X, Y, Z, n_orders) float array
        RISH features (paper Eq. 1) of the 3T attenuation, orders as in ``bundle.config['orders']``.
    mask : (X, Y, Z) bool array
        Brain mask; outputs are zero outside it.
    bundle : Bundle
        From :func:`bids_dmri_ldm.ml.bundle.load_bundle`, networks already on ``device``.
    device : torch.device or str
    seed : int, optional
        Seed of the stochastic samples (default: the bundle's ``translation.seed``).
    num_samples : int, optional
        K (default: the bundle's ``translation.num_samples``). With K = 1 the
        translation is deterministic (DDIM, eta = 0).  With K > 1,
        K samples are drawn with seeded DDIM noise (eta = ``translation.sample_eta``)
        and their mean and per-voxel standard deviation are returned.
    t0, guidance, ddim_steps
        Overrides of the bundle's per-order noise level, guidance omega (Eq. 10) and the
        number of DDIM steps (used for the inversion and again for the sampling).
    max_batch : int
        Largest network batch (orders x samples) processed at once (memory bound).
    precision : str
        Network arithmetic, one of :data:`PRECISIONS` (default ``auto``: mixed precision on
        CUDA; on the CPU the bundle's ``translation.cpu_precision``, see
        :func:`resolve_precision`).  The sidecar records what ran (``Precision``) and what was
        asked (``PrecisionOption``).

    Returns
    -------
    Translation
        ``(pred_7t, std, recon_3t, provenance)``, arrays (X, Y, Z, n_orders) float32.
    """
    if num_samples is None:
        num_samples = int(bundle.config["translation"]["num_samples"])
    device = torch.device(device)
    try:
        return _translate(rish_3t, mask, bundle, device, seed, num_samples, t0,
                          guidance, ddim_steps, max_batch, precision)
    except torch.OutOfMemoryError:
        raise DeviceMemoryError(
            f"out of GPU memory translating on {device} (model grid {bundle.config['grid']}, "
            f"{num_samples} sample(s)): use fewer samples, a smaller max_batch, a bundle with a "
            "smaller grid, or --device cpu") from None


def _translate(rish_3t, mask, bundle, device, seed, num_samples, t0, guidance, ddim_steps,
               max_batch, precision) -> Translation:
    start = time.perf_counter()
    cfg = bundle.config
    tr = cfg["translation"]
    option, precision = precision, resolve_precision(cfg, device, precision)
    orders = cfg["orders"]
    n_orders = len(orders)
    rish_3t = np.asarray(rish_3t, dtype=np.float32)
    mask = np.asarray(mask, bool)
    if rish_3t.ndim != 4 or rish_3t.shape[-1] != n_orders or rish_3t.shape[:3] != mask.shape:
        raise ValueError(f"rish_3t must be (X, Y, Z, {n_orders}) matching the mask {mask.shape}, "
                         f"got {rish_3t.shape}")
    if num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    t0_l = [int(t) for t in _per_order(t0, tr["t0"], n_orders, "t0")]
    w_l = _per_order(guidance, tr["guidance"], n_orders, "guidance")
    steps = int(ddim_steps or tr["ddim_steps"])
    seed = int(tr["seed"] if seed is None else seed)
    eta = 0.0 if num_samples == 1 else float(tr["sample_eta"])
    norm = cfg["normalisation"]
    grid = tuple(cfg["grid"])

    y = normalise(rish_3t, mask, norm)
    x, _, crop = to_model_grid(y, mask, grid, tr["crop_margin"])
    with torch.no_grad():  # no autograd graph of the encoder either (nothing is trained here)
        z3 = encode(bundle, x, "vqvae3t", device, precision)       # (n_orders, C, ...)
        recon = decode(bundle, z3, "vqvae3t", device, precision)
    gain_7t = np.asarray(_per_order(tr.get("gain_7t"), [1.0] * n_orders, n_orders, "gain_7t"), np.float64)
    gain_3t = np.asarray(_per_order(tr.get("gain_3t"), [1.0] * n_orders, n_orders, "gain_3t"), np.float32)
    recon_3t = denormalised_from_model_grid(recon, crop, mask, norm) * gain_3t

    # K > 1: float64 sums for the mean and SD maps; K = 1: the one prediction is the mean
    total = np.zeros((*mask.shape, n_orders), np.float64) if num_samples > 1 else None
    total_sq = np.zeros_like(total) if num_samples > 1 else None
    mean = None
    per_chunk = max(1, max_batch // n_orders)
    done = 0
    while done < num_samples:
        k = min(per_chunk, num_samples - done)
        z_in = z3.repeat(k, 1, 1, 1, 1)
        # one noise stream per (sample, order): results do not depend on max_batch
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + (done + s) * 101 + o)
                for s in range(k) for o in range(n_orders)]
        z7 = translate_latents(bundle, z_in, t0_l * k, w_l * k, steps, device, eta, gens, precision)
        with torch.no_grad():
            dec = decode(bundle, z7, "vqvae7t", device, precision)
            with autocast_for(device, precision=precision):
                out = bundle.networks["sr"](dec).float()
        for s in range(k):
            pred = denormalised_from_model_grid(out[s * n_orders:(s + 1) * n_orders], crop, mask, norm)
            if total is None:
                # x gain in float64 and rounded once to float32, as the K > 1 mean is, without the
                # full-grid float64 arrays (their fresh memory took ~0.4 s at HCP size)
                mean = np.multiply(pred, gain_7t, out=pred, casting="unsafe")
            else:
                pred = pred.astype(np.float64) * gain_7t
                total += pred
                total_sq += pred ** 2
        done += k
    std = None
    if num_samples > 1:
        mean = total / num_samples
        var = np.clip(total_sq / num_samples - mean ** 2, 0, None) * num_samples / (num_samples - 1)
        std = np.sqrt(var).astype(np.float32)
    provenance = {
        "Method": "ldm", "ModelName": cfg["name"], "ModelConfigSHA256": bundle.config_sha256,
        "ModelGrid": list(grid), "RISHOrders": list(orders), "NoiseLevelT0": t0_l,
        "GuidanceScale": w_l, "DDIMSteps": steps, "Seed": seed, "NumSamples": num_samples,
        "SamplingEta": eta, "LinearGain7T": gain_7t.tolist(), "LinearGain3T": gain_3t.tolist(),
        "InversionClass": tr["invert_class"], "Requantise": tr["requantise"],
        "Device": str(device), **precision_provenance(device, precision), "PrecisionOption": option,
        "CropBox": crop.as_list(), "ElapsedSeconds": round(time.perf_counter() - start, 3),
    }
    return Translation(mean.astype(np.float32, copy=False), std, recon_3t, provenance)

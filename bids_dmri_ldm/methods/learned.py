"""Learned methods (``ldm``, ``cnn``): a model bundle predicts 7T RISH, and the scale maps are
lambda_l = sqrt(pred_7T / reference) (Eq. 2).

``ldm`` is the latent diffusion model (Zhu et al., MICCAI 2024): the bundle (``models/demo/`` by
default, checksums verified) translates the source RISH maps to predicted 7T RISH maps
(:func:`bids_dmri_ldm.ml.inference.translate_rish`); the reference is the input 3T RISH
(``scale_reference="input"``) or the 3T RISH passed through the same VQ-VAE encode/decode path
(``"roundtrip"``, so that the autoencoder's own error cancels in the ratio), optionally
smoothed. ``cnn`` is the supervised baseline (:func:`bids_dmri_ldm.ml.cnn.predict_rish`).

:func:`inspect_learned` verifies a bundle and reads what it is without building its networks
(what the participant level needs before any run); :func:`load_ldm`/:func:`load_cnn` load it
for use (in the node that predicts the scale maps).
"""
from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..bundles import model_folder, model_sha256, resolve_model_dir, verify_bundle
from ..core.sh import DEFAULT_TAU
from ..errors import BundleError, MethodError, MethodUnavailableError
from ..ml.modelconfig import (
    DEFAULT_SCALE_REFERENCE,
    DEFAULT_SCALE_SMOOTHING,
    ConfigError,
    validate_config,
)
from ..ml.scalemaps import input_sigma, learned_scale_maps, per_order
from ..vocabulary import SCALE_REFERENCES
from .base import (
    MODEL_WARNINGS_KEY,
    Method,
    MethodOptions,
    ModelInfo,
    ScaleMapPrediction,
    check_rish_shape,
    model_warnings,
)

LDM_MODEL_NAME = model_folder(Method.LDM.value).shipped
"""Name of the shipped ldm bundle used when no ``--model-dir`` is given (``models/demo/``)."""

CNN_MODEL_NAME = model_folder(Method.CNN.value).shipped
"""Name of the shipped cnn bundle used when no ``--model-dir`` is given (``models/cnn-demo/``)."""


@dataclass
class LearnedMethod:
    """Scale maps from a learned model bundle (``ldm`` or ``cnn``) that predicts 7T RISH.

    ``predict_scale_maps`` brings the run into canonical (RAS+) voxel order
    (:mod:`bids_dmri_ldm.ml.orientation`: the networks always see one orientation, whatever the
    input's storage order), predicts 7T RISH (:meth:`translate`) and returns
    lambda_l = sqrt(pred_7T_l / (ref_l + tau)) (Eq. 2) inside the mask, 1 outside, mapped back to
    the input's voxel order, with

    - ``scale_reference="input"``: ref = the input 3T RISH (option (i));
    - ``scale_reference="roundtrip"``: ref = the 3T RISH through the same lossy path as the
      prediction (the ldm: 3T VQ-VAE encoder/decoder and the model-grid resampling; the cnn: the
      model-grid resampling), so the loss of detail cancels in the ratio and the full-resolution
      3T SH keep their detail when lambda is applied (Eq. 3).

    ``scale_smoothing`` (one sigma, or one per order; > 0) smooths with a Gaussian of that sigma in
    model-grid voxels (converted to input voxels through the brain crop box), mask-normalised so
    the background does not leak in: lambda_l^2 = G*pred_l / (G*ref_l + tau), the local mean of
    the voxel-wise lambda^2 weighted by the reference RISH (robust where the reference is small
    and noisy); :mod:`bids_dmri_ldm.ml.scalemaps`.
    """

    #: Its maps vary inside the mask (the scale-map step computes the mask's distance transform
    #: for their fill beside the prediction: ``interfaces/steps/fit.py``).
    varying_maps: ClassVar[bool] = True

    bundle: Any
    device: Any = "cpu"
    precision: str = "auto"
    scale_reference: str = DEFAULT_SCALE_REFERENCE
    scale_smoothing: float | Sequence[float] = DEFAULT_SCALE_SMOOTHING
    tau: float = DEFAULT_TAU
    name: str = Method.LDM.value

    @property
    def scale_strength(self) -> list[float]:
        """alpha_l of lambda_l ** alpha_l (1: the model's full ratio; 0: order left unchanged),
        chosen on the validation pairs by training (``translation.scale_strength``)."""
        return per_order(self.bundle.config["translation"].get("scale_strength", 1.0), len(self.orders))

    @property
    def scale_gain(self) -> list[float]:
        """g_l of g_l * lambda_l ** alpha_l: 1, or the brain-wide factor that matched the validation
        pairs' mean 7T RISH, chosen by training (``translation.scale_gain``)."""
        return per_order(self.bundle.config["translation"].get("scale_gain", 1.0), len(self.orders))

    @property
    def orders(self) -> tuple[int, ...]:
        return tuple(int(o) for o in self.bundle.config["orders"])

    @property
    def sha256(self) -> str:
        """SHA-256 of the bundle's checksum list, which covers every file of the bundle."""
        return self.bundle.sha256 or self.bundle.config_sha256

    @property
    def trained_for(self) -> dict[str, Any] | None:
        """The bundle's ``trained_for`` record, or None for a bundle trained before it existed."""
        return self.bundle.config.get("trained_for")

    @property
    def model_name(self) -> str:
        """The bundle's own name (``config.json`` ``name``)."""
        return self.bundle.config["name"]

    @property
    def info(self) -> ModelInfo:
        """The model's identity (what the participant level records)."""
        return ModelInfo(self.name, self.model_name, Path(self.bundle.path), self.sha256, self.trained_for,
                         self.validation)

    @property
    def validation(self) -> dict[str, Any] | None:
        """The group level's validation table of the bundle (``config.json["validation"]``)."""
        return self.bundle.config.get("validation")

    def translate(self, rish: np.ndarray, mask: np.ndarray):
        """Predicted 7T RISH of canonical-orientation arrays (a ``Translation``)."""
        raise NotImplementedError

    def predict_scale_maps(self, rish_source: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> ScaleMapPrediction:
        from ..ml.inference import DeviceMemoryError
        from ..ml.orientation import Reorientation

        check_rish_shape(rish_source, mask, self.orders)
        mask = np.asarray(mask, dtype=bool)
        reo = Reorientation.of(affine, mask.shape)
        rish_c, mask_c = reo.to_canonical(np.asarray(rish_source, np.float32)), reo.to_canonical(mask)
        try:
            result = self.translate(rish_c, mask_c)
        except DeviceMemoryError as err:
            raise MethodError(str(err)) from None
        reference = rish_c if self.scale_reference == "input" else result.recon_3t
        grid, box = self.bundle.config["grid"], result.provenance["CropBox"]
        sigmas = per_order(self.scale_smoothing, len(self.orders))
        scale = learned_scale_maps(result.pred_7t, reference, mask_c, box, grid, sigmas, self.tau,
                                   self.scale_strength, self.scale_gain)
        provenance = {
            "Method": self.name,
            "Model": {"Name": self.bundle.config["name"], "Path": str(self.bundle.path),
                      "SHA256": self.sha256, "Created": self.bundle.config.get("created")},
            **{k: v for k, v in result.provenance.items() if k not in ("Method",)},
            "CanonicalOrientation": "RAS (nibabel closest canonical); CropBox in that voxel order",
            "ScaleReference": self.scale_reference,
            "ScaleSmoothingSigma": sigmas,
            "ScaleSmoothingSigmaInputVoxels": [input_sigma(s, box, grid) for s in sigmas],
            "ScaleStrength": self.scale_strength,
            "ScaleGain": self.scale_gain,
            "Tau": float(self.tau),
        }
        provenance["RISHOrders"] = list(self.orders)
        if model_warnings(self):
            provenance[MODEL_WARNINGS_KEY] = model_warnings(self)
        std = None if result.std is None else reo.from_canonical(result.std)
        return ScaleMapPrediction(reo.from_canonical(scale), provenance, std=std)


@dataclass
class LdmMethod(LearnedMethod):
    """The latent diffusion model (:func:`~bids_dmri_ldm.ml.inference.translate_rish`) with the
    bundle's or the user's sampling settings."""

    seed: int | None = None
    num_samples: int | None = None
    t0: Sequence[int] | None = None
    guidance: Sequence[float] | None = None
    ddim_steps: int | None = None

    def translate(self, rish: np.ndarray, mask: np.ndarray):
        from ..ml.inference import translate_rish

        return translate_rish(rish, mask, self.bundle, device=self.device, seed=self.seed,
                              num_samples=self.num_samples, t0=None if self.t0 is None else list(self.t0),
                              guidance=None if self.guidance is None else list(self.guidance),
                              ddim_steps=self.ddim_steps, precision=self.precision)


@dataclass
class CnnMethod(LearnedMethod):
    """The supervised CNN baseline (:func:`~bids_dmri_ldm.ml.cnn.predict_rish`)."""

    name: str = Method.CNN.value

    def translate(self, rish: np.ndarray, mask: np.ndarray):
        from ..ml.cnn import predict_rish

        return predict_rish(rish, mask, self.bundle, device=self.device, precision=self.precision)


def _bundle_loader(method: Method):
    """:func:`~bids_dmri_ldm.ml.bundle.load_bundle` (imports the networks: torch and MONAI), or
    MethodUnavailableError when they are missing from this installation."""
    try:
        from ..ml.bundle import load_bundle
    except ImportError as err:  # torch/monai missing from this installation
        raise MethodUnavailableError(f"--method {method.value} needs PyTorch and MONAI: {err}") from None
    return load_bundle


def _device(method: Method, options: MethodOptions):
    """The torch device of ``options``; MethodUnavailableError as :func:`_check_device`."""
    from ..ml.device import resolve_device

    return _resolve_device_with(resolve_device, method, options)


def _check_device(method: Method, options: MethodOptions) -> None:
    """MethodUnavailableError when the device of ``options`` cannot be used, or when PyTorch or
    MONAI are not installed; found without importing torch where
    :func:`~bids_dmri_ldm.ml.device.resolve_device_type` can, as in the main process's
    inspection of the model."""
    from ..ml.device import resolve_device_type

    _resolve_device_with(resolve_device_type, method, options)


def _resolve_device_with(resolve: Callable[[str], Any], method: Method, options: MethodOptions) -> Any:
    """``resolve(options.device)`` with its errors, and missing PyTorch or MONAI, as
    MethodUnavailableError. Imports no network: MONAI (~2.5 s on 2 cores) is imported where a
    bundle is loaded, not where it is only inspected."""
    for module in ("torch", "monai"):
        if importlib.util.find_spec(module) is None:
            raise MethodUnavailableError(f"--method {method.value} needs PyTorch and MONAI: no module named '{module}'")
    from ..ml.device import DeviceUnavailableError

    try:
        return resolve(str(options.device or "cpu"))
    except DeviceUnavailableError as err:
        raise MethodUnavailableError(str(err)) from None


def read_bundle_config(path: Path) -> dict[str, Any]:
    """``config.json`` of a verified bundle, validated (:func:`~bids_dmri_ldm.ml.modelconfig.validate_config`).

    Raises
    ------
    BundleError
        Unreadable or invalid config.
    """
    try:
        config = json.loads((path / "config.json").read_text())
        validate_config(config, "bundle")
    except (json.JSONDecodeError, ConfigError, KeyError, TypeError) as err:
        raise BundleError(f"model bundle {path}: invalid config.json: {err}") from None
    return config


def _check_kind(method: Method, path: Path, config: dict[str, Any]) -> None:
    kind = config.get("method", "ldm")
    if kind != method.value:
        raise MethodError(f"{path} is a {kind} bundle, not {method.value}")


def inspect_learned(method: Method, model_dir: Path | None, options: MethodOptions) -> ModelInfo:
    """A learned method's model, verified (every file's checksum, the config, the options against
    it) without building its networks.

    Raises
    ------
    MethodError
        As :func:`load_learned` would (:class:`~bids_dmri_ldm.errors.ModelNotFoundError`: no
        bundle; :class:`~bids_dmri_ldm.errors.BundleError`: incomplete, tampered or invalid).
    """
    path = resolve_model_dir(method.value, model_dir)
    _check_device(method, options)
    verify_bundle(path)
    config = read_bundle_config(path)
    _check_kind(method, path, config)
    scale_options(config, options)
    return ModelInfo(method.value, config["name"], path, model_sha256(path, model_folder(method.value).checksum_names),
                     config.get("trained_for"), config.get("validation"))


def _load_bundle_for(method: Method, model_dir: Path | None, options: MethodOptions):
    """Resolve, verify and load a learned method's bundle on the requested device."""
    load_bundle = _bundle_loader(method)
    import torch

    if options.omp_nthreads:
        torch.set_num_threads(int(options.omp_nthreads))
    path = resolve_model_dir(method.value, model_dir)
    device = _device(method, options)
    bundle = load_bundle(path, device)
    _check_kind(method, path, bundle.config)
    return bundle, device


def _option(value: Any, default: Any) -> Any:
    return default if value is None else value


def scale_options(config: dict[str, Any], options: MethodOptions) -> dict[str, Any]:
    """``scale_reference`` and ``scale_smoothing``: the user's override, else the bundle's
    (``config["translation"]``).

    Raises
    ------
    MethodError
        A reference not in :data:`~bids_dmri_ldm.vocabulary.SCALE_REFERENCES`, or a smoothing
        that is not one value >= 0 (or one per order).
    """
    translation = config["translation"]
    reference = str(_option(options.scale_reference, translation.get("scale_reference", DEFAULT_SCALE_REFERENCE)))
    if reference not in SCALE_REFERENCES:
        raise MethodError(f"scale_reference must be one of {SCALE_REFERENCES}, got {reference!r}")
    smoothing = _option(options.scale_smoothing, translation.get("scale_smoothing", DEFAULT_SCALE_SMOOTHING))
    try:
        smoothing = per_order(smoothing, len(config["orders"]))
    except (TypeError, ValueError) as err:
        raise MethodError(f"scale_smoothing: {err}") from None
    if not all(np.isfinite(s) and s >= 0 for s in smoothing):
        raise MethodError(f"scale_smoothing must be >= 0, got {smoothing}")
    return {"scale_reference": reference, "scale_smoothing": smoothing}


def load_ldm(model_dir: Path | None, options: MethodOptions) -> LdmMethod:
    """The ldm with the bundle of ``model_dir`` (None: the shipped ``models/demo``)."""
    bundle, device = _load_bundle_for(Method.LDM, model_dir, options)
    return LdmMethod(
        bundle=bundle, device=device, precision=options.precision, seed=options.seed, num_samples=options.num_samples,
        t0=options.t0, guidance=options.guidance, ddim_steps=options.ddim_steps,
        **scale_options(bundle.config, options),
    )


def load_cnn(model_dir: Path | None, options: MethodOptions) -> CnnMethod:
    """The cnn baseline with the bundle of ``model_dir`` (None: the shipped ``models/cnn-demo``)."""
    bundle, device = _load_bundle_for(Method.CNN, model_dir, options)
    return CnnMethod(bundle=bundle, device=device, precision=options.precision, **scale_options(bundle.config, options))

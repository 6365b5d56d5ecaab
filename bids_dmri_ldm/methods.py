"""Registry of 3T -> 7T translation methods.

A method maps the RISH maps of a source (3T) run to RISH scale maps (paper Eq. 2)

.. math:: \\lambda_l = \\sqrt{RISH_l^{target} / (RISH_l^{source} + \\tau)}

that the workflow then applies to the source SH coefficients (Eq. 3). Shapes: RISH maps and scale
maps are ``(X, Y, Z, n_orders)`` float32 (orders on the last axis, :data:`~.core.sh.RISH_ORDERS`),
the brain mask ``(X, Y, Z)`` bool, the affine ``(4, 4)`` voxel -> scanner mm.

Registered methods (:class:`Method`):

``identity``
    lambda = 1 everywhere: SH fit and rebuild only — what the 3T data look like through the same
    pipeline (the baseline every other method is compared to).
``rish-global``
    One factor per RISH order, learned at the group level from paired 3T/7T participants
    (:func:`fit_rish_global`) and read from a small JSON model file; every file listed in the
    folder's ``SHA256SUMS`` is checked, and the model's SHA-256 is that of ``SHA256SUMS``.
``ldm``
    The latent diffusion model (Zhu et al., MICCAI 2024): a model bundle (``models/demo/`` by
    default, checksums verified) translates the source RISH maps to predicted 7T RISH maps
    (:func:`bids_dmri_ldm.ml.inference.translate_rish`) and lambda_l = sqrt(pred_7T / reference)
    (Eq. 2), where the reference is the input 3T RISH (``scale_reference="input"``) or the 3T
    RISH passed through the same VQ-VAE encode/decode path (``"roundtrip"``, so that the
    autoencoder's own error cancels in the ratio), optionally smoothed (:class:`LdmMethod`).

Every model records what it was trained for (``trained_for``: shell(s), SH order, RISH orders,
signal normalisation; :func:`bids_dmri_ldm.ml.modelconfig.trained_for`); :func:`model_mismatches`
compares it with a run's settings, and the participant level refuses a mismatch.

Adding a method is one entry in :data:`LOADERS`: a callable ``(model_dir, options) -> object``
whose ``predict_scale_maps(rish_source, mask, affine)`` returns a :class:`ScaleMapPrediction`
(and, for a method with a model, a ``trained_for`` attribute: the record, or None when unknown).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .config import SCALE_REFERENCES
from .core.resample import resample, resample_mask
from .core.sh import DEFAULT_TAU, RISH_ORDERS, scale_maps
from .errors import MethodError, MethodUnavailableError, ModelNotFoundError
from .ml.modelconfig import (
    DEFAULT_SCALE_REFERENCE,
    DEFAULT_SCALE_SMOOTHING,
    ConfigError,
    trained_for_mismatches,
    validate_trained_for,
)
from .ml.modelconfig import trained_for as make_trained_for
from .ml.scalemaps import input_sigma, learned_scale_maps, per_order

RISH_GLOBAL_MODEL_FILE = "rish_global.json"
"""File name of a rish-global model inside its model directory."""

CHECKSUM_FILE = "SHA256SUMS"
"""``sha256sum``-format checksum list next to a model's files."""

MODELS_ENV = "BIDS_DMRI_LDM_MODELS"
"""Environment variable naming the folder that holds the default models (one sub-folder each)."""


class Method(str, Enum):
    """Translation methods selectable with ``--method``."""

    IDENTITY = "identity"
    RISH_GLOBAL = "rish-global"
    LDM = "ldm"
    CNN = "cnn"

    def __str__(self) -> str:  # argparse choices / messages show the plain value
        return self.value


@dataclass
class ScaleMapPrediction:
    """Output of a method for one run.

    Attributes
    ----------
    scale : ndarray, shape (X, Y, Z, n_orders), float32
        RISH scale maps lambda_l (Eq. 2); 1 outside the brain mask.
    provenance : dict
        JSON-serialisable description (method, model name/version/checksum, settings) that goes
        into every derivative sidecar.
    """

    scale: np.ndarray
    provenance: dict[str, Any] = field(default_factory=dict)
    std: np.ndarray | None = None
    """Per-voxel standard deviation ``(X, Y, Z, n_orders)`` of the predicted 7T RISH over the
    samples (``ldm`` with ``num_samples > 1``), else None."""


class TranslationMethod(Protocol):
    """What a loaded method offers the workflow."""

    name: str
    orders: tuple[int, ...]

    def predict_scale_maps(self, rish_source: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> ScaleMapPrediction:
        """Scale maps ``(X, Y, Z, n_orders)`` for source RISH maps ``(X, Y, Z, n_orders)``."""
        ...


# ---------------------------------------------------------------------------------------------
# identity


@dataclass
class IdentityMethod:
    """lambda = 1: the SH fit and rebuild alone (baseline)."""

    name: str = Method.IDENTITY.value
    orders: tuple[int, ...] = RISH_ORDERS

    def predict_scale_maps(self, rish_source: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> ScaleMapPrediction:
        _check_rish_shape(rish_source, mask, self.orders)
        scale = np.ones(rish_source.shape, dtype=np.float32)
        return ScaleMapPrediction(scale, {"Method": self.name, "Model": None, "RISHOrders": list(self.orders)})


def _load_identity(model_dir: Path | None, options: Mapping[str, Any]) -> IdentityMethod:
    return IdentityMethod()


# ---------------------------------------------------------------------------------------------
# rish-global


@dataclass
class RishGlobalModel:
    """One scale factor per RISH order (a spatially constant lambda_l), for each trained shell.

    Attributes
    ----------
    factors : tuple of float
        lambda_l for each order in ``orders``, of ``shell`` (the lowest trained shell).
    orders : tuple of int
        RISH orders, e.g. (0, 2, 4).
    tau : float
        The tau of Eq. 2 used when fitting.
    training : dict
        Summary of the data the factors were learned from (of every shell under ``per_shell``).
    name, version : str
        Model identity recorded in derivative sidecars.
    sha256 : str or None
        SHA-256 of the model folder's checksum list (``SHA256SUMS``), which covers every file
        of the model.
    shell, sh_order_max : float, int or None
        The b-value (s/mm²) of ``factors`` and the SH order of the data the factors were learned from.
    shell_factors : dict
        ``{b-value: factors}`` of every trained shell, ascending (``{shell: factors}`` when only
        ``shell`` and ``factors`` are given; empty when the shell is unknown).
    """

    factors: tuple[float, ...]
    orders: tuple[int, ...] = RISH_ORDERS
    tau: float = DEFAULT_TAU
    training: dict[str, Any] = field(default_factory=dict)
    name: str = Method.RISH_GLOBAL.value
    version: str = "1"
    sha256: str | None = None
    shell: float | None = None
    sh_order_max: int | None = None
    validation: dict[str, Any] | None = None
    """The group level's validation table (:mod:`bids_dmri_ldm.evaluation.gate`), if any."""
    shell_factors: dict[float, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.shell_factors and self.shell is not None:
            self.shell_factors = {float(self.shell): tuple(float(f) for f in self.factors)}
        self.shell_factors = {float(b): tuple(float(f) for f in fs) for b, fs in sorted(self.shell_factors.items())}
        if self.shell_factors:
            self.shell, self.factors = next(iter(self.shell_factors.items()))

    @property
    def shells(self) -> list[float]:
        """The trained shells (s/mm², ascending; empty when unknown)."""
        return list(self.shell_factors)

    def factors_for(self, bval: float, tolerance: float) -> tuple[float, ...] | None:
        """The factors of the trained shell nearest to ``bval`` within ``tolerance``, or None;
        a model that does not record its shell applies its factors to any shell."""
        if not self.shell_factors:
            return self.factors
        gaps = {b: abs(b - float(bval)) for b in self.shell_factors}
        nearest = min(gaps, key=gaps.get)
        return self.shell_factors[nearest] if gaps[nearest] <= tolerance else None

    def to_json(self) -> dict[str, Any]:
        """The JSON document of the model file (checksum excluded: it lives in SHA256SUMS).

        ``factors``/``shell`` are those of the lowest shell (what a single-shell model holds);
        ``shell_factors`` lists every shell.
        """
        return {
            "name": self.name,
            "version": self.version,
            "method": Method.RISH_GLOBAL.value,
            "orders": list(self.orders),
            "factors": [float(f) for f in self.factors],
            "tau": float(self.tau),
            "shell": self.shell,
            "shell_factors": [{"shell": b, "factors": list(fs)} for b, fs in self.shell_factors.items()],
            "sh_order_max": self.sh_order_max,
            "trained_for": self.trained_for,
            "training": self.training,
            **({"validation": self.validation} if self.validation is not None else {}),
        }

    @property
    def trained_for(self) -> dict[str, Any] | None:
        """The ``trained_for`` record (None when the shell or the SH order is unknown)."""
        if not self.shell_factors or self.sh_order_max is None:
            return None
        return make_trained_for(self.shells, self.sh_order_max, self.orders)


@dataclass
class RishGlobalMethod:
    """Apply a :class:`RishGlobalModel`: lambda_l(x) = factor_l inside the mask, 1 outside.

    ``shell`` picks the factors of that trained shell (:meth:`for_shell`); None: the model's
    first (lowest) shell.
    """

    model: RishGlobalModel
    name: str = Method.RISH_GLOBAL.value
    shell: float | None = None

    @property
    def orders(self) -> tuple[int, ...]:
        return self.model.orders

    @property
    def validation(self) -> dict[str, Any] | None:
        """The group level's validation table of the model, if any."""
        return self.model.validation

    @property
    def trained_for(self) -> dict[str, Any] | None:
        return self.model.trained_for

    @property
    def factors(self) -> tuple[float, ...]:
        """The factors applied: those of ``shell``, or of the model's first shell."""
        return self.model.factors if self.shell is None else self.model.shell_factors.get(self.shell, self.model.factors)

    def for_shell(self, bval: float, tolerance: float) -> RishGlobalMethod | None:
        """This method with the factors of the trained shell within ``tolerance`` of ``bval``
        (None when the model has no such shell)."""
        if self.model.factors_for(bval, tolerance) is None:
            return None
        if not self.model.shell_factors:
            return self
        nearest = min(self.model.shell_factors, key=lambda b: abs(b - float(bval)))
        return RishGlobalMethod(self.model, self.name, nearest)

    def predict_scale_maps(self, rish_source: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> ScaleMapPrediction:
        _check_rish_shape(rish_source, mask, self.orders)
        scale = np.ones(rish_source.shape, dtype=np.float32)
        scale[np.asarray(mask, dtype=bool)] = np.asarray(self.factors, dtype=np.float32)
        provenance = {
            "Method": self.name,
            "Model": {"Name": self.model.name, "Version": self.model.version, "SHA256": self.model.sha256},
            "RISHOrders": list(self.orders),
            "ScaleFactors": [float(f) for f in self.factors],
            "Tau": float(self.model.tau),
        }
        if model_warnings(self):
            provenance[MODEL_WARNINGS_KEY] = model_warnings(self)
        return ScaleMapPrediction(scale, provenance)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checksums(model_dir: Path) -> dict[str, str]:
    """``{file name: sha256}`` from a model directory's ``SHA256SUMS`` (``sha256sum`` format)."""
    sums_file = model_dir / CHECKSUM_FILE
    if not sums_file.is_file():
        raise MethodError(f"model directory {model_dir} has no {CHECKSUM_FILE} file")
    sums = {}
    for line in sums_file.read_text().splitlines():
        if line.strip():
            digest, _, name = line.strip().partition("  ")
            sums[name.lstrip("*")] = digest.lower()
    return sums


def load_rish_global_model(model_dir: str | os.PathLike) -> RishGlobalModel:
    """Read and verify a rish-global model directory (``rish_global.json`` + ``SHA256SUMS``).

    Every file listed in ``SHA256SUMS`` (``rish_global.json`` at least; the shipped model also
    lists its model card) must match its checksum; the model's ``sha256`` is the SHA-256 of
    ``SHA256SUMS`` itself, so it names the content of every listed file.

    Raises
    ------
    MethodError
        When the file is missing, a checksum does not match, or the content is invalid.
    """
    model_dir = Path(model_dir)
    model_file = model_dir / RISH_GLOBAL_MODEL_FILE
    if not model_file.is_file():
        raise ModelNotFoundError(f"no rish-global model in {model_dir} (expected {RISH_GLOBAL_MODEL_FILE}); "
                          "train one with the group level or pass --model-dir")
    sums = read_checksums(model_dir)
    if RISH_GLOBAL_MODEL_FILE not in sums:
        raise MethodError(f"{model_dir / CHECKSUM_FILE} lists no checksum for {RISH_GLOBAL_MODEL_FILE}")
    for name, expected in sums.items():
        listed = model_dir / name
        if Path(name).name != name or not listed.is_file():
            raise MethodError(f"{model_dir / CHECKSUM_FILE} lists {name!r}, which is not a file of {model_dir}")
        actual = sha256_file(listed)
        if expected != actual:
            raise MethodError(f"checksum mismatch for {listed}: expected {expected}, found {actual} "
                              "(file corrupt or edited)")
    try:
        doc = json.loads(model_file.read_text())
        orders = tuple(int(o) for o in doc["orders"])
        factors = tuple(float(f) for f in doc["factors"])
        shell = None if doc.get("shell") is None else float(doc["shell"])
        sh_order_max = None if doc.get("sh_order_max") is None else int(doc["sh_order_max"])
        shell_factors = {float(e["shell"]): tuple(float(f) for f in e["factors"]) for e in doc.get("shell_factors") or []}
        if shell is not None and not shell_factors:
            shell_factors = {shell: factors}
        if doc.get("trained_for") is not None:
            record = validate_trained_for(doc["trained_for"], f"{RISH_GLOBAL_MODEL_FILE}: trained_for")
            sh_order_max = int(record["sh_order_max"])
            if not shell_factors and len(record["shells"]) == 1:
                shell_factors = {float(record["shells"][0]): factors}
            if sorted(float(b) for b in record["shells"]) != sorted(shell_factors):
                raise ValueError(f"trained_for.shells {record['shells']} differ from the shells of the factors "
                                 f"{sorted(shell_factors)}")
            if [int(o) for o in record["rish_orders"]] != list(orders):
                raise ValueError(f"trained_for.rish_orders {record['rish_orders']} differ from orders {list(orders)}")
        if shell_factors and shell_factors[min(shell_factors)] != factors:
            raise ValueError("factors differ from those of the lowest shell in shell_factors")
    except (ValueError, KeyError, TypeError, ConfigError) as err:
        raise MethodError(f"invalid rish-global model {model_file}: {err}") from None
    if doc.get("method", Method.RISH_GLOBAL.value) != Method.RISH_GLOBAL.value:
        raise MethodError(f"{model_file} is a {doc.get('method')!r} model, not rish-global")
    for values in [factors, *shell_factors.values()]:
        if len(orders) != len(values) or not all(np.isfinite(values)) or min(values) <= 0:
            raise MethodError(f"invalid rish-global model {model_file}: need one positive finite factor per order "
                              "(of every shell)")
    return RishGlobalModel(
        factors=factors,
        orders=orders,
        tau=float(doc.get("tau", DEFAULT_TAU)),
        training=doc.get("training", {}),
        name=str(doc.get("name", Method.RISH_GLOBAL.value)),
        version=str(doc.get("version", "1")),
        sha256=sha256_file(model_dir / CHECKSUM_FILE),
        shell=shell,
        sh_order_max=sh_order_max,
        validation=doc.get("validation"),
        shell_factors=shell_factors,
    )


def save_rish_global_model(model: RishGlobalModel, model_dir: str | os.PathLike) -> Path:
    """Write ``rish_global.json`` and ``SHA256SUMS`` atomically; return the model file path."""
    from .bids.derivatives import (
        atomic_write_text,  # local: bids/ imports nothing from here
    )

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    model_file = model_dir / RISH_GLOBAL_MODEL_FILE
    atomic_write_text(model_file, json.dumps(model.to_json(), indent=2, sort_keys=True) + "\n")
    digest = sha256_file(model_file)
    checksums = atomic_write_text(model_dir / CHECKSUM_FILE, f"{digest}  {RISH_GLOBAL_MODEL_FILE}\n")
    model.sha256 = sha256_file(checksums)
    return model_file


def _load_rish_global(model_dir: Path | None, options: Mapping[str, Any]) -> RishGlobalMethod:
    return RishGlobalMethod(load_rish_global_model(resolve_model_dir(Method.RISH_GLOBAL, model_dir)))


# ---------------------------------------------------------------------------------------------
# ldm

LDM_MODEL_NAME = "demo"
"""Name of the shipped ldm bundle used when no ``--model-dir`` is given (``models/demo/``)."""

CNN_MODEL_NAME = "cnn-demo"
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

    bundle: Any
    device: Any = "cpu"
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
    def model(self) -> LearnedMethod:
        """The loaded model (``model.sha256`` is what the workflow records, as for rish-global)."""
        return self

    @property
    def validation(self) -> dict[str, Any] | None:
        """The group level's validation table of the bundle (``config.json["validation"]``)."""
        return self.bundle.config.get("validation")

    def translate(self, rish: np.ndarray, mask: np.ndarray):
        """Predicted 7T RISH of canonical-orientation arrays (a ``Translation``)."""
        raise NotImplementedError

    def predict_scale_maps(self, rish_source: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> ScaleMapPrediction:
        from .ml.inference import DeviceMemoryError
        from .ml.orientation import Reorientation

        _check_rish_shape(rish_source, mask, self.orders)
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
                                   self.scale_strength)
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
        from .ml.inference import translate_rish

        return translate_rish(rish, mask, self.bundle, device=self.device, seed=self.seed,
                              num_samples=self.num_samples, t0=self.t0, guidance=self.guidance,
                              ddim_steps=self.ddim_steps)


@dataclass
class CnnMethod(LearnedMethod):
    """The supervised CNN baseline (:func:`~bids_dmri_ldm.ml.cnn.predict_rish`)."""

    name: str = Method.CNN.value

    def translate(self, rish: np.ndarray, mask: np.ndarray):
        from .ml.cnn import predict_rish

        return predict_rish(rish, mask, self.bundle, device=self.device)


SHIPPED_BUNDLES = {Method.LDM: LDM_MODEL_NAME, Method.CNN: CNN_MODEL_NAME}
"""Learned method -> name of its shipped bundle under ``models/``."""


def resolve_bundle_dir(method: Method | str, model_dir: str | os.PathLike | None) -> Path:
    """A learned method's bundle folder: ``model_dir`` itself, ``model_dir/<method>`` or
    ``model_dir/<shipped name>`` when one holds ``config.json``; with no ``model_dir`` the shipped
    bundle (:func:`bids_dmri_ldm.config.find_shipped_model`)."""
    from .config import find_shipped_model

    method = Method(method)
    shipped = SHIPPED_BUNDLES[method]
    if model_dir is None:
        found = find_shipped_model(shipped)
        if found is None:
            raise ModelNotFoundError(
                f"no {method.value} model bundle found (models/{shipped}/ is not installed); pass --model-dir "
                "with a bundle trained by the group level, or use --method rish-global")
        return found
    model_dir = Path(model_dir)
    for candidate in (model_dir, model_dir / method.value, model_dir / shipped):
        if (candidate / "config.json").is_file():
            return candidate
    if not model_dir.exists():
        raise ModelNotFoundError(f"{method.value} model directory {model_dir} does not exist")
    raise ModelNotFoundError(f"no {method.value} model bundle in {model_dir} (no config.json there or in "
                             f"{method.value}/); train one with the group level")


def resolve_ldm_bundle_dir(model_dir: str | os.PathLike | None) -> Path:
    """:func:`resolve_bundle_dir` of the ldm."""
    return resolve_bundle_dir(Method.LDM, model_dir)


def _option(options: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = options.get(key)
    return default if value is None else value


def _load_bundle_for(method: Method, model_dir: Path | None, options: Mapping[str, Any]):
    """Resolve, verify and load a learned method's bundle on the requested device."""
    try:
        from .ml.bundle import BundleError, load_bundle
        from .ml.device import DeviceUnavailableError, resolve_device
    except ImportError as err:  # torch/monai missing from this installation
        raise MethodUnavailableError(f"--method {method.value} needs PyTorch and MONAI: {err}") from None
    import torch

    threads = options.get("omp_nthreads")
    if threads:
        torch.set_num_threads(int(threads))
    path = resolve_bundle_dir(method, model_dir)
    try:
        device = resolve_device(str(options.get("device") or "cpu"))
    except DeviceUnavailableError as err:
        raise MethodUnavailableError(str(err)) from None
    try:
        bundle = load_bundle(path, device)
    except BundleError as err:
        raise MethodError(str(err)) from None
    if bundle.method != method.value:
        raise MethodError(f"{path} is a {bundle.method} bundle, not {method.value}")
    return bundle, device


def _scale_options(bundle, options: Mapping[str, Any]) -> dict[str, Any]:
    """``scale_reference`` and ``scale_smoothing``: the user's override, else the bundle's."""
    translation = bundle.config["translation"]
    reference = str(_option(options, "scale_reference", translation.get("scale_reference", DEFAULT_SCALE_REFERENCE)))
    if reference not in SCALE_REFERENCES:
        raise MethodError(f"scale_reference must be one of {SCALE_REFERENCES}, got {reference!r}")
    smoothing = _option(options, "scale_smoothing", translation.get("scale_smoothing", DEFAULT_SCALE_SMOOTHING))
    try:
        smoothing = per_order(smoothing, len(bundle.config["orders"]))
    except (TypeError, ValueError) as err:
        raise MethodError(f"scale_smoothing: {err}") from None
    if not all(np.isfinite(s) and s >= 0 for s in smoothing):
        raise MethodError(f"scale_smoothing must be >= 0, got {smoothing}")
    return {"scale_reference": reference, "scale_smoothing": smoothing}


def _load_ldm(model_dir: Path | None, options: Mapping[str, Any]) -> LdmMethod:
    bundle, device = _load_bundle_for(Method.LDM, model_dir, options)
    return LdmMethod(
        bundle=bundle, device=device, seed=options.get("seed"), num_samples=options.get("num_samples"),
        t0=options.get("t0"), guidance=options.get("guidance"), ddim_steps=options.get("ddim_steps"),
        **_scale_options(bundle, options),
    )


def _load_cnn(model_dir: Path | None, options: Mapping[str, Any]) -> CnnMethod:
    bundle, device = _load_bundle_for(Method.CNN, model_dir, options)
    return CnnMethod(bundle=bundle, device=device, **_scale_options(bundle, options))


# ---------------------------------------------------------------------------------------------
# model / data compatibility


def model_mismatches(translator: Any, shells: Sequence[float] | None, shell_tolerance: float, sh_order_max: int,
                     rish_orders: Sequence[int] = RISH_ORDERS) -> list[tuple[str, str, str]] | None:
    """How a loaded method's model differs from the data a run gives it.

    ``shells`` are the shells ``--shell`` asks to translate: each must be one the model was
    trained for. ``None`` (every shell of each run): the shells are matched per run
    (:func:`bids_dmri_ldm.core.shells.plan_volumes`: a shell the model does not cover is passed
    through, a run none of whose shells it covers is refused).

    Returns
    -------
    list of (setting, the model's value, the run's value), or None
        Empty when the model matches; None when the method has no model or its model does not
        record what it was trained for (nothing can be compared).
    """
    record = getattr(translator, "trained_for", None)
    if record is None:
        return None
    found = trained_for_mismatches(record, None, shell_tolerance, sh_order_max, rish_orders)
    for shell in shells or ():
        found += [m for m in trained_for_mismatches(record, shell, shell_tolerance, sh_order_max, rish_orders)
                  if m[0] == "shell"]
    return found


def trained_shells(translator: Any) -> list[float] | None:
    """The shells (s/mm²) a loaded method's model was trained for; None for a method without a
    model (it applies to every shell) or a model that does not record them."""
    record = getattr(translator, "trained_for", None)
    return None if record is None else [float(b) for b in record["shells"]]


def method_for_shell(translator: Any, bval: float, tolerance: float) -> Any:
    """The method that translates the shell ``bval`` (s/mm²): rish-global with the factors of
    that trained shell; any other method as it is (a learned bundle holds one shell, checked
    by :func:`bids_dmri_ldm.core.shells.plan_volumes` before). None when the model has no
    factors for the shell."""
    if isinstance(translator, RishGlobalMethod):
        return translator.for_shell(bval, tolerance)
    return translator


# ---------------------------------------------------------------------------------------------
# registry

LOADERS: dict[Method, Callable[[Path | None, Mapping[str, Any]], TranslationMethod]] = {
    Method.IDENTITY: _load_identity,
    Method.RISH_GLOBAL: _load_rish_global,
    Method.LDM: _load_ldm,
    Method.CNN: _load_cnn,
}
"""Method -> loader ``(model_dir or None, options) -> TranslationMethod``. One entry per method."""

NEEDS_MODEL: frozenset[Method] = frozenset({Method.RISH_GLOBAL, Method.LDM, Method.CNN})
"""Methods that read a model directory (recorded in provenance, checked before work starts)."""


def default_models_root() -> Path:
    """Folder holding the shipped models: ``$BIDS_DMRI_LDM_MODELS`` or the repository's ``models/``."""
    env = os.environ.get(MODELS_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "models"


def resolve_model_dir(method: Method | str, model_dir: str | os.PathLike | None) -> Path:
    """The model directory of ``method``.

    ``model_dir`` may be the model's own folder or a folder of models holding ``<method>/``;
    ``None`` selects the shipped default (:func:`default_models_root`).
    """
    method = Method(method)
    if method in SHIPPED_BUNDLES:  # a bundle folder, its <method>/ or shipped-name sub-folder, or models/<name>/
        try:
            return resolve_bundle_dir(method, model_dir)
        except ModelNotFoundError:
            pass
    if model_dir is None:
        return default_models_root() / method.value
    model_dir = Path(model_dir)
    nested = model_dir / method.value
    return nested if nested.is_dir() else model_dir


def load_method(name: Method | str, model_dir: str | os.PathLike | None = None,
                options: Mapping[str, Any] | None = None) -> TranslationMethod:
    """Load a translation method by name.

    Raises
    ------
    MethodError
        Unknown name, missing/corrupt model (a tampered ldm bundle included);
        :class:`ModelNotFoundError` when the model directory does not exist.
    """
    try:
        method = Method(name)
    except ValueError:
        choices = ", ".join(m.value for m in Method)
        raise MethodError(f"unknown method {name!r} (choose from {choices})") from None
    return LOADERS[method](None if model_dir is None else Path(model_dir), dict(options or {}))


MODEL_WARNINGS_KEY = "ModelWarnings"
"""Provenance key of a model's standing warnings (the validation gate's verdict), which the
derivative sidecars also list under ``RunWarnings``."""


def model_warnings(method: Any) -> list[str]:
    """Warnings that come with a loaded model: it lost to ``identity`` on its validation pairs, or
    it has no validation table (:func:`bids_dmri_ldm.evaluation.gate.validation_warning`).
    ``identity`` (no model) has none."""
    if not hasattr(method, "validation"):
        return []
    from .evaluation.gate import validation_warning

    name = method.bundle.config["name"] if hasattr(method, "bundle") else method.model.name
    message = validation_warning(f"{method.name} {name!r}", method.validation)
    return [message] if message else []


def _check_rish_shape(rish: np.ndarray, mask: np.ndarray, orders: Sequence[int]) -> None:
    if rish.ndim != 4 or rish.shape[-1] != len(orders):
        raise ValueError(f"RISH maps must be (X, Y, Z, {len(orders)}), got {rish.shape}")
    if tuple(np.shape(mask)) != rish.shape[:3]:
        raise ValueError(f"mask shape {np.shape(mask)} does not match RISH maps {rish.shape[:3]}")


# ---------------------------------------------------------------------------------------------
# rish-global fitting (group level)


@dataclass
class RishPair:
    """RISH maps of one participant's paired source (3T) and target (7T) scans.

    Both scans are of the same head in the same scanner-world space, so their affines
    ``(4, 4)`` (voxel -> mm) relate the two grids directly; no registration is done here.
    ``rish_*`` are ``(X, Y, Z, n_orders)``, ``mask_*`` ``(X, Y, Z)`` bool.
    """

    rish_source: np.ndarray
    mask_source: np.ndarray
    affine_source: np.ndarray
    rish_target: np.ndarray
    mask_target: np.ndarray
    affine_target: np.ndarray
    label: str = ""


MIN_RISH0 = 1e-4
"""RISH_0 (of S/S0) below which a voxel is treated as background when fitting (a brain voxel
has RISH_0 = 4 pi mean(S/S0)^2, about 1 at b = 1000)."""

MIN_RELATIVE_RISH = 1e-6
"""RISH_l / RISH_0 below which order l is treated as absent in a voxel when fitting."""


def pair_scale_samples(pair: RishPair, tau: float = DEFAULT_TAU, min_rish0: float = MIN_RISH0,
                       min_relative: float = MIN_RELATIVE_RISH) -> np.ndarray:
    """Voxel-wise lambda (Eq. 2) of one pair on the target grid, shape (n_voxels, n_orders).

    The source RISH maps and mask are resampled onto the target (7T) grid through the affines
    (cubic B-spline for RISH, linear + threshold for the mask); voxels inside both masks whose
    RISH_0 exceeds ``min_rish0`` in both scans count. Where the source has no order-l content
    (``RISH_l <= min_relative * RISH_0``, e.g. l > 0 in a noiseless isotropic voxel) lambda_l is
    0/0, not a measurement: it is NaN here and left out of the average.
    """
    shape = pair.rish_target.shape[:3]
    source = resample(pair.rish_source, pair.affine_source, pair.affine_target, shape, order=3)
    mask_source = resample_mask(pair.mask_source, pair.affine_source, pair.affine_target, shape)
    both = mask_source & np.asarray(pair.mask_target, dtype=bool)
    # Voxels without signal in either scan (RISH_0 ~ 0: background inside a loose mask) carry no
    # information about the 3T -> 7T change.
    both &= (source[..., 0] > min_rish0) & (pair.rish_target[..., 0] > min_rish0)
    src, tgt = source[both], pair.rish_target[both]
    lam = scale_maps(tgt, src, tau)
    defined = src > min_relative * src[:, :1]
    defined[:, 0] = True
    return np.where(defined, lam, np.nan).astype(np.float32)


def fit_rish_global(pairs: Iterable[RishPair], orders: Sequence[int] = RISH_ORDERS, tau: float = DEFAULT_TAU,
                    shell: float | None = None, sh_order_max: int | None = None,
                    extra_training: Mapping[str, Any] | None = None) -> RishGlobalModel:
    """Learn one scale factor per RISH order from paired participants.

    factor_l = median over brain voxels, pooled over all pairs, of lambda_l (Eq. 2) computed on
    the target grid (:func:`pair_scale_samples`; voxels where lambda_l is undefined are left out
    for that order). The median is robust to the skull-ring and CSF voxels where RISH of high
    orders is tiny and lambda explodes.

    Returns
    -------
    RishGlobalModel
        With a training summary (pairs, voxel counts, per-pair medians, pooled quartiles).
    """
    samples, per_pair = [], []
    for pair in pairs:
        lam = pair_scale_samples(pair, tau)
        if lam.shape[0] == 0 or np.all(np.isnan(lam), axis=0).any():
            raise ValueError(f"pair {pair.label or '?'}: no brain voxel with signal in both scans "
                             "(masks do not overlap, or an order is absent everywhere)")
        samples.append(lam)
        per_pair.append({"label": pair.label, "n_voxels": int(lam.shape[0]),
                         "median": [float(v) for v in np.nanmedian(lam, axis=0)],
                         "n_defined": [int(v) for v in np.sum(np.isfinite(lam), axis=0)]})
    if not samples:
        raise ValueError("fit_rish_global needs at least one source/target pair")
    pooled = np.concatenate(samples, axis=0)
    factors = tuple(float(v) for v in np.nanmedian(pooled, axis=0))
    q25, q75 = np.nanpercentile(pooled, [25, 75], axis=0)
    training = {
        "statistic": "median of voxel-wise lambda_l over brain voxels, pooled over pairs",
        "n_pairs": len(samples),
        "n_voxels": int(pooled.shape[0]),
        "n_defined": [int(v) for v in np.sum(np.isfinite(pooled), axis=0)],
        "quartiles": {"q25": [float(v) for v in q25], "q75": [float(v) for v in q75]},
        "pairs": per_pair,
        "created": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
    }
    training.update(extra_training or {})
    return RishGlobalModel(factors=factors, orders=tuple(orders), tau=tau, training=training,
                           shell=shell, sh_order_max=sh_order_max)


def fit_rish_global_shells(pairs_by_shell: Mapping[float, Sequence[RishPair]], orders: Sequence[int] = RISH_ORDERS,
                           tau: float = DEFAULT_TAU, sh_order_max: int | None = None,
                           extra_training: Mapping[str, Any] | None = None) -> RishGlobalModel:
    """:func:`fit_rish_global` on each shell's pairs: one model holding the factors of every shell.

    Parameters
    ----------
    pairs_by_shell : mapping
        ``{b-value (s/mm²): pairs of that shell's RISH maps}``.

    Returns
    -------
    RishGlobalModel
        ``shell_factors`` of every shell; ``training`` is that of the lowest shell (for readers
        of single-shell models) with every shell's under ``per_shell`` (``{"1000": {...}}``).
    """
    if not pairs_by_shell:
        raise ValueError("fit_rish_global_shells needs at least one shell")
    fitted = {float(b): fit_rish_global(pairs, orders, tau, shell=float(b), sh_order_max=sh_order_max)
              for b, pairs in sorted(pairs_by_shell.items())}
    first = fitted[min(fitted)]
    training = dict(first.training)
    training["per_shell"] = {f"{b:g}": {k: v for k, v in m.training.items() if k != "created"} for b, m in fitted.items()}
    training.update(extra_training or {})
    return RishGlobalModel(factors=first.factors, orders=tuple(orders), tau=tau, training=training,
                           sh_order_max=sh_order_max,
                           shell_factors={b: m.factors for b, m in fitted.items()})


__all__ = [
    "LOADERS",
    "NEEDS_MODEL",
    "CnnMethod",
    "IdentityMethod",
    "LdmMethod",
    "LearnedMethod",
    "Method",
    "MethodError",
    "MethodUnavailableError",
    "ModelNotFoundError",
    "RishGlobalMethod",
    "RishGlobalModel",
    "RishPair",
    "ScaleMapPrediction",
    "TranslationMethod",
    "default_models_root",
    "fit_rish_global",
    "fit_rish_global_shells",
    "load_method",
    "load_rish_global_model",
    "method_for_shell",
    "model_mismatches",
    "model_warnings",
    "pair_scale_samples",
    "resolve_bundle_dir",
    "resolve_ldm_bundle_dir",
    "resolve_model_dir",
    "save_rish_global_model",
    "sha256_file",
    "trained_shells",
]

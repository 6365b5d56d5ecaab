"""What every translation method shares: its name, its output, its options, the identity of its
model, and the warnings that come with a model.

Shapes: RISH maps and scale maps are ``(X, Y, Z, n_orders)`` float32 (orders on the last axis,
:data:`~bids_dmri_ldm.core.sh.RISH_ORDERS`), the brain mask ``(X, Y, Z)`` bool, the affine
``(4, 4)`` voxel -> scanner mm.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import MethodError
from ..vocabulary import PRECISIONS, Method

__all__ = ["MODEL_WARNINGS_KEY", "Method", "MethodOptions", "ModelInfo", "ScaleMapPrediction", "TranslationMethod",
           "check_rish_shape", "model_warnings"]


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


@dataclass(frozen=True)
class MethodOptions:
    """Run options handed to a method's loader (the learned methods use them; identity and
    rish-global ignore them). None: the model bundle's own value.

    Crosses the nipype graph as one JSON string (:meth:`to_json`, keys sorted: a stable node
    hash) and is rebuilt, checked, with :meth:`from_json` where the method is loaded.

    Attributes
    ----------
    device : str
        ``"cpu"`` or ``"cuda"`` (resolved by the command line).
    seed : int or None
        Random seed of the sampling.
    num_samples, ddim_steps : int or None
        ldm: samples averaged (> 1 also writes the SD map); DDIM steps.
    t0, guidance : tuple or None
        ldm: per-order noise level and guidance omega.
    scale_reference : str or None
        ``"input"`` or ``"roundtrip"`` (:data:`~bids_dmri_ldm.vocabulary.SCALE_REFERENCES`).
    scale_smoothing : float, tuple or None
        Gaussian sigma (model-grid voxels) of the scale maps, one or one per order.
    omp_nthreads : int or None
        Threads torch may use in this process.
    precision : str
        Network arithmetic of ldm/cnn inference (``auto``, ``fp32``, ``bf16``:
        :data:`~bids_dmri_ldm.vocabulary.PRECISIONS`).
    """

    device: str = "cpu"
    seed: int | None = None
    num_samples: int | None = None
    ddim_steps: int | None = None
    t0: tuple[int, ...] | None = None
    guidance: tuple[float, ...] | None = None
    scale_reference: str | None = None
    scale_smoothing: float | tuple[float, ...] | None = None
    omp_nthreads: int | None = None
    precision: str = "auto"

    def __post_init__(self) -> None:
        for name in ("t0", "guidance", "scale_smoothing"):  # sequences are stored as tuples
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        if self.precision not in PRECISIONS:
            raise MethodError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view (sequences as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def to_json(self) -> str:
        """:meth:`to_dict` as a JSON string (keys sorted)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> MethodOptions:
        """Options from :meth:`to_json` (empty or None: the defaults)."""
        return cls.from_dict(json.loads(text) if text else None)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | MethodOptions | None) -> MethodOptions:
        """Options from :meth:`to_dict`'s mapping (missing keys: defaults; None values: defaults
        for ``device``); an instance is returned as it is.

        Raises
        ------
        MethodError
            A key that is not an option.
        """
        if isinstance(data, MethodOptions):
            return data
        data = dict(data or {})
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise MethodError(f"unknown method option(s) {', '.join(unknown)}")
        if data.get("device") is None:
            data.pop("device", None)
        return cls(**data)


@dataclass(frozen=True)
class ModelInfo:
    """What a method's model is, read and verified without loading it for use (no network
    built): what the participant level records and checks before any run.

    Attributes
    ----------
    name : str
        The method (``"rish-global"``, ``"ldm"``, ``"cnn"``).
    model_name : str
        The model's own name (``config.json``/``rish_global.json`` ``name``).
    path : Path
        The model folder.
    sha256 : str or None
        SHA-256 of the folder's checksum list (every file of the model).
    trained_for : dict or None
        What the model was trained for (:func:`bids_dmri_ldm.ml.modelconfig.trained_for`).
    validation : dict or None
        The group level's validation table, if any.
    """

    name: str
    model_name: str
    path: Path
    sha256: str | None
    trained_for: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None


MODEL_WARNINGS_KEY = "ModelWarnings"
"""Provenance key of a model's standing warnings (the validation gate's verdict), which the
derivative sidecars also list under ``RunWarnings``."""


def model_warnings(method: Any) -> list[str]:
    """Warnings that come with a model (a loaded method or its :class:`ModelInfo`): it lost to
    ``identity`` on its validation pairs, or it has no validation table
    (:func:`bids_dmri_ldm.evaluation.gate.validation_warning`). ``identity`` (no model) has none."""
    if method is None or not hasattr(method, "validation"):
        return []
    from ..evaluation.gate import validation_warning

    message = validation_warning(f"{method.name} {method.model_name!r}", method.validation)
    return [message] if message else []


def check_rish_shape(rish: np.ndarray, mask: np.ndarray, orders: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``rish`` is ``(X, Y, Z, len(orders))`` and ``mask`` ``(X, Y, Z)``."""
    if rish.ndim != 4 or rish.shape[-1] != len(orders):
        raise ValueError(f"RISH maps must be (X, Y, Z, {len(orders)}), got {rish.shape}")
    if tuple(np.shape(mask)) != rish.shape[:3]:
        raise ValueError(f"mask shape {np.shape(mask)} does not match RISH maps {rish.shape[:3]}")

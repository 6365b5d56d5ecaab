"""``rish-global``: one factor per RISH order and shell, read from a small JSON model.

The model (:class:`~bids_dmri_ldm.ml.rish_global.RishGlobalModel`) is learned at the group level
(:func:`~bids_dmri_ldm.ml.rish_global.fit_rish_global_shells`) and written here with its checksum
list (:func:`save_rish_global_model`); every file the list names is checked when it is read, and
the model's SHA-256 is that of the list (:mod:`bids_dmri_ldm.bundles`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundles import (
    checksum_list_text,
    listed_checksums,
    model_folder,
    resolve_model_dir,
    sha256_file,
)
from ..core.sh import DEFAULT_TAU
from ..errors import MethodError, ModelNotFoundError
from ..io.files import atomic_write_text
from ..ml.modelconfig import ConfigError, validate_trained_for
from ..ml.rish_global import RISH_GLOBAL, RishGlobalModel
from .base import (
    MODEL_WARNINGS_KEY,
    Method,
    MethodOptions,
    ModelInfo,
    ScaleMapPrediction,
    check_rish_shape,
    model_warnings,
)

RISH_GLOBAL_MODEL_FILE = model_folder(RISH_GLOBAL).marker
"""File name of a rish-global model inside its model directory."""

CHECKSUM_FILE = model_folder(RISH_GLOBAL).checksums
"""``sha256sum``-format checksum list written next to a rish-global model (``SHA256SUMS``; a
folder with ``checksums.sha256`` instead is read too)."""


def read_checksums(model_dir: Path) -> tuple[Path, dict[str, str]]:
    """``(checksum list, {file name: sha256})`` of a rish-global model folder.

    Raises
    ------
    MethodError
        No checksum list, or a malformed one.
    """
    return listed_checksums(model_dir, model_folder(RISH_GLOBAL).checksum_names, MethodError,
                            f"model directory {model_dir} has no {CHECKSUM_FILE} file")


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
    def model_name(self) -> str:
        """The model's own name (``rish_global.json`` ``name``)."""
        return self.model.name

    @property
    def info(self) -> ModelInfo:
        """The model's identity (what the participant level records)."""
        return ModelInfo(self.name, self.model.name, self.model.path, self.model.sha256, self.trained_for,
                         self.validation)

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
        check_rish_shape(rish_source, mask, self.orders)
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
    listing, sums = read_checksums(model_dir)
    if RISH_GLOBAL_MODEL_FILE not in sums:
        raise MethodError(f"{listing} lists no checksum for {RISH_GLOBAL_MODEL_FILE}")
    for name, expected in sums.items():
        listed = model_dir / name
        if Path(name).name != name or not listed.is_file():
            raise MethodError(f"{listing} lists {name!r}, which is not a file of {model_dir}")
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
    if doc.get("method", RISH_GLOBAL) != RISH_GLOBAL:
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
        name=str(doc.get("name", RISH_GLOBAL)),
        version=str(doc.get("version", "1")),
        sha256=sha256_file(listing),
        shell=shell,
        sh_order_max=sh_order_max,
        validation=doc.get("validation"),
        shell_factors=shell_factors,
        path=model_dir,
    )


def save_rish_global_model(model: RishGlobalModel, model_dir: str | os.PathLike) -> Path:
    """Write ``rish_global.json`` and ``SHA256SUMS`` atomically; return the model file path."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    model_file = model_dir / RISH_GLOBAL_MODEL_FILE
    atomic_write_text(model_file, json.dumps(model.to_json(), indent=2, sort_keys=True) + "\n")
    checksums = atomic_write_text(model_dir / CHECKSUM_FILE, checksum_list_text(model_dir, [RISH_GLOBAL_MODEL_FILE]))
    model.sha256 = sha256_file(checksums)
    model.path = model_dir
    return model_file


def load_rish_global(model_dir: Path | None, options: MethodOptions) -> RishGlobalMethod:
    """The rish-global method with the model of ``model_dir`` (:func:`resolve_model_dir`; None: the
    shipped model); ``options`` are ignored."""
    return RishGlobalMethod(load_rish_global_model(resolve_model_dir(RISH_GLOBAL, model_dir)))

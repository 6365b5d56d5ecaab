"""The registry of 3T -> 7T translation methods: name -> loader, and what the participant level
asks of a method before any run (its model's identity and what it was trained for).

Adding a method is one entry in :data:`LOADERS` (a callable ``(model_dir, options) -> object``
whose ``predict_scale_maps(rish_source, mask, affine)`` returns a
:class:`~bids_dmri_ldm.methods.base.ScaleMapPrediction`, and, for a method with a model, a
``trained_for`` attribute: the record, or None when unknown) and, for a method with a model, one
in :data:`INSPECTORS` and :data:`bids_dmri_ldm.bundles.MODEL_FOLDERS`.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.sh import RISH_ORDERS
from ..errors import MethodError
from ..ml.modelconfig import trained_for_mismatches
from .base import Method, MethodOptions, ModelInfo, TranslationMethod
from .identity import load_identity
from .learned import inspect_learned, load_cnn, load_ldm
from .rish_global import RishGlobalMethod, load_rish_global

LOADERS: dict[Method, Callable[[Path | None, MethodOptions], TranslationMethod]] = {
    Method.IDENTITY: load_identity,
    Method.RISH_GLOBAL: load_rish_global,
    Method.LDM: load_ldm,
    Method.CNN: load_cnn,
}
"""Method -> loader ``(model_dir or None, options) -> TranslationMethod``. One entry per method."""


def _inspect_rish_global(model_dir: Path | None, options: MethodOptions) -> ModelInfo:
    return load_rish_global(model_dir, options).info


INSPECTORS: dict[Method, Callable[[Path | None, MethodOptions], ModelInfo]] = {
    Method.RISH_GLOBAL: _inspect_rish_global,  # the model is a small JSON file: read it whole
    Method.LDM: lambda model_dir, options: inspect_learned(Method.LDM, model_dir, options),
    Method.CNN: lambda model_dir, options: inspect_learned(Method.CNN, model_dir, options),
}
"""Method with a model -> ``(model_dir or None, options) -> ModelInfo``: the model verified and
described without being loaded for use (no network is built)."""

NEEDS_MODEL: frozenset[Method] = frozenset(INSPECTORS)
"""Methods that read a model directory (recorded in provenance, checked before work starts)."""


def method_of(name: Method | str) -> Method:
    """The :class:`Method` called ``name``.

    Raises
    ------
    MethodError
        Not a registered method.
    """
    try:
        return Method(name)
    except ValueError:
        choices = ", ".join(m.value for m in Method)
        raise MethodError(f"unknown method {name!r} (choose from {choices})") from None


def load_method(name: Method | str, model_dir: str | os.PathLike | None = None,
                options: MethodOptions | Mapping[str, Any] | None = None) -> TranslationMethod:
    """Load a translation method by name, ready to predict (a learned method's networks built).

    ``options``: :class:`~bids_dmri_ldm.methods.base.MethodOptions`, or its
    :meth:`~bids_dmri_ldm.methods.base.MethodOptions.to_dict` mapping (as it crosses nipype).

    Raises
    ------
    MethodError
        Unknown name or option, missing/corrupt model (a tampered ldm bundle included);
        :class:`~bids_dmri_ldm.errors.ModelNotFoundError` when the model directory does not exist.
    """
    method = method_of(name)
    return LOADERS[method](None if model_dir is None else Path(model_dir), MethodOptions.from_dict(options))


def inspect_model(name: Method | str, model_dir: str | os.PathLike | None = None,
                  options: MethodOptions | Mapping[str, Any] | None = None) -> ModelInfo | None:
    """The model of a method, verified and described without building it (None for a method
    without a model): what the participant level records (``ModelSHA256``), compares with the
    runs (``trained_for``) and warns about (``validation``) before any run starts. Fails as
    :func:`load_method` would.
    """
    method = method_of(name)
    options = MethodOptions.from_dict(options)
    inspect = INSPECTORS.get(method)
    return None if inspect is None else inspect(None if model_dir is None else Path(model_dir), options)


# ---------------------------------------------------------------------------------------------
# model / data compatibility (of a loaded method or its ModelInfo)


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

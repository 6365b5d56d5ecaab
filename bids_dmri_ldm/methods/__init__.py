"""3T -> 7T translation methods: the registry and what each method does.

A method maps the RISH maps of a source (3T) run to RISH scale maps (paper Eq. 2)

.. math:: \\lambda_l = \\sqrt{RISH_l^{target} / (RISH_l^{source} + \\tau)}

that the workflow then applies to the source SH coefficients (Eq. 3). Shapes: RISH maps and scale
maps are ``(X, Y, Z, n_orders)`` float32 (orders on the last axis, :data:`~.core.sh.RISH_ORDERS`),
the brain mask ``(X, Y, Z)`` bool, the affine ``(4, 4)`` voxel -> scanner mm.

Registered methods (:class:`~bids_dmri_ldm.vocabulary.Method`), one module each:

``identity`` (:mod:`.identity`)
    lambda = 1 everywhere: SH fit and rebuild only — what the 3T data look like through the same
    pipeline (the baseline every other method is compared to).
``rish-global`` (:mod:`.rish_global`)
    One factor per RISH order and shell, learned at the group level from paired 3T/7T
    participants (:func:`bids_dmri_ldm.ml.rish_global.fit_rish_global_shells`) and read from a
    small JSON model file whose folder's checksums are verified.
``ldm``, ``cnn`` (:mod:`.learned`)
    A model bundle (``models/demo/``, ``models/cnn-demo/`` by default, checksums verified)
    predicts 7T RISH maps; lambda_l = sqrt(pred_7T / reference) (Eq. 2).

Model folders are found and checked by :mod:`bids_dmri_ldm.bundles`. Every model records what
it was trained for (``trained_for``); :func:`model_mismatches` compares it with a run's
settings, and the participant level refuses a mismatch. :mod:`.registry` maps names to loaders
(:func:`load_method`: ready to predict) and to inspectors (:func:`inspect_model`: the model's
identity, verified, no network built).
"""
from ..bundles import sha256_file
from ..errors import MethodError, MethodUnavailableError, ModelNotFoundError
from ..ml.rish_global import RishGlobalModel
from .base import (
    MODEL_WARNINGS_KEY,
    Method,
    MethodOptions,
    ModelInfo,
    ScaleMapPrediction,
    TranslationMethod,
    model_warnings,
)
from .identity import IdentityMethod
from .learned import CnnMethod, LdmMethod, LearnedMethod
from .registry import (
    INSPECTORS,
    LOADERS,
    NEEDS_MODEL,
    inspect_model,
    load_method,
    method_for_shell,
    model_mismatches,
    trained_shells,
)
from .rish_global import (
    RISH_GLOBAL_MODEL_FILE,
    RishGlobalMethod,
    load_rish_global_model,
    save_rish_global_model,
)

__all__ = [
    "INSPECTORS",
    "LOADERS",
    "MODEL_WARNINGS_KEY",
    "NEEDS_MODEL",
    "RISH_GLOBAL_MODEL_FILE",
    "CnnMethod",
    "IdentityMethod",
    "LdmMethod",
    "LearnedMethod",
    "Method",
    "MethodError",
    "MethodOptions",
    "MethodUnavailableError",
    "ModelInfo",
    "ModelNotFoundError",
    "RishGlobalMethod",
    "RishGlobalModel",
    "ScaleMapPrediction",
    "TranslationMethod",
    "inspect_model",
    "load_method",
    "load_rish_global_model",
    "method_for_shell",
    "model_mismatches",
    "model_warnings",
    "save_rish_global_model",
    "sha256_file",
    "trained_shells",
]

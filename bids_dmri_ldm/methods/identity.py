"""``identity``: lambda = 1 everywhere, the SH fit and rebuild alone (the baseline)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.sh import RISH_ORDERS
from .base import Method, MethodOptions, ScaleMapPrediction, check_rish_shape


@dataclass
class IdentityMethod:
    """lambda = 1: the SH fit and rebuild alone (baseline)."""

    name: str = Method.IDENTITY.value
    orders: tuple[int, ...] = RISH_ORDERS

    def predict_scale_maps(self, rish_source: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> ScaleMapPrediction:
        check_rish_shape(rish_source, mask, self.orders)
        scale = np.ones(rish_source.shape, dtype=np.float32)
        return ScaleMapPrediction(scale, {"Method": self.name, "Model": None, "RISHOrders": list(self.orders)})


def load_identity(model_dir: Path | None, options: MethodOptions) -> IdentityMethod:
    """The identity method (no model; ``model_dir`` and ``options`` are ignored)."""
    return IdentityMethod()

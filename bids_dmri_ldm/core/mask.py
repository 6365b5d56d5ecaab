"""Brain masks from the mean b0 (dipy ``median_otsu``)."""
from __future__ import annotations

import numpy as np
from dipy.segment.mask import median_otsu


def brain_mask(mean_b0: np.ndarray, median_radius: int = 4, numpass: int = 4) -> np.ndarray:
    """Brain mask ``(X, Y, Z)`` bool of a mean-b0 volume with dipy's median_otsu.

    The radius is reduced for tiny volumes so the median filter never exceeds a quarter of the
    field of view.
    """
    mean_b0 = np.nan_to_num(np.asarray(mean_b0, dtype=np.float32))
    radius = max(1, min(median_radius, min(mean_b0.shape) // 4))
    _, mask = median_otsu(mean_b0, median_radius=radius, numpass=numpass)
    return mask.astype(bool)

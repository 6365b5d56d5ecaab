"""What the participant report shows for one run (:class:`RunData`): the interface between
:mod:`.load` (derivatives -> arrays) and :mod:`.render` (arrays -> HTML).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RunData:
    """Everything the report shows for one run, as arrays on one grid.

    All volumes are ``(X, Y, Z[, n_orders])`` on the output grid, in the
    closest canonical (RAS) voxel orientation; any of them may be None.

    Attributes
    ----------
    label : str
        Run name (the derivative prefix, e.g. ``sub-01_ses-3T_run-1``).
    mask : ndarray of bool
    mean_b0 : ndarray
        Mean of the output's b0 volumes.
    rish_source, rish_predicted : ndarray, shape (X, Y, Z, n_orders)
        RISH_l of the 3T source and of the prediction (paper Eq. 1).
    scale : ndarray, shape (X, Y, Z, n_orders)
        lambda_l (paper Eq. 2).
    uncertainty : ndarray, shape (X, Y, Z, n_orders)
        Standard deviation over samples (``--num-samples`` > 1).
    fa_in, fa_out : ndarray
        FA of input and output (NaN where not fitted).
    evec_in, evec_out : ndarray, shape (X, Y, Z, 3)
        Principal eigenvectors, components in canonical voxel axes.
    orders : tuple of int
        SH orders on the last axis of the RISH maps.
    sidecar : dict
        JSON sidecar of the 7T-like DWI (provenance).
    warnings : list of str
        Warnings raised during the run.
    problems : dict
        ``{what: message}`` for inputs that could not be loaded; the sections
        that need them show the message.
    shell_bval : float or None
        b-value (s/mm²) of the shell the tensors were fitted on.
    """

    label: str
    mask: np.ndarray | None = None
    mean_b0: np.ndarray | None = None
    rish_source: np.ndarray | None = None
    rish_predicted: np.ndarray | None = None
    scale: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    fa_in: np.ndarray | None = None
    fa_out: np.ndarray | None = None
    evec_in: np.ndarray | None = None
    evec_out: np.ndarray | None = None
    orders: tuple[int, ...] = (0, 2, 4)
    sidecar: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)
    shell_bval: float | None = None

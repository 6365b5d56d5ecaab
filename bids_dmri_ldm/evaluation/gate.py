"""Validation gate of the group level: a new model against ``identity`` on held-out pairs.

After every group-level training (rish-global, ldm, cnn) the new model translates each held-out
validation participant's 3T scan, in memory, the way the participant level does at the 3T grid
(:func:`translate_dwi`: S/S0, least-squares SH, scale maps lambda applied inside the brain mask
(Eq. 3), rebuild on the 3T directions, b0 volumes kept), and the result is scored against the
participant's real 7T scan in the paper's 8 columns (NMSE and SSIM of RISH L0/L2/L4 and FA) with
the evaluation code (:mod:`.pipeline`: maps on each grid, resampled into the 7T grid through the
affines, one common mask). The same is done for ``identity``, for ``rish-global`` fitted on the
training pairs only, and for the untouched 3T scan, so the table says whether the model earns its
place. A model that loses to ``identity`` in any column is flagged (:func:`losing_columns`); the
group level warns and the participant level records it in every sidecar.

Arrays follow the package conventions: ``(X, Y, Z[, C])``, gradients on the last axis.

The table helpers (:func:`losing_columns`, :func:`validation_warning`, ...) import nothing heavy:
the participant level's method loader uses them to warn about a model that lost.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.display import bounding_box
from ..core.sh import RISH_ORDERS, SHModel, scale_sh, sh_basis

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import PredictionOnTruth, ShellData
    from .report import ScoreRow

IDENTITY = "identity"
"""Name of the baseline every model must beat."""

COLUMNS = tuple(f"{metric}_{name}" for metric in ("nmse", "ssim") for name in ("L0", "L2", "L4", "FA"))
"""The paper's 8 columns (``evaluation.scoring.score_columns()``): nmse_L0 .. nmse_FA, ssim_L0 .. ssim_FA."""


@dataclass(frozen=True)
class ValidationPair:
    """One held-out participant: its 3T run (with the RISH features the model reads) and 7T run.

    ``rish``/``mask``/``affine`` are the 3T run's RISH maps ``(X, Y, Z, 3)``, brain mask and
    voxel-to-world affine, computed by the participant-level steps (the group level's cache).
    """

    participant: str
    session: str | None
    source_dwi: Path
    source_bval: Path
    source_bvec: Path
    target_dwi: Path
    target_bval: Path
    target_bvec: Path
    rish: np.ndarray
    mask: np.ndarray
    affine: np.ndarray


def translate_dwi(source: ShellData, region: np.ndarray, scale: np.ndarray, brain: np.ndarray,
                  sh_order_max: int = 4, orders: Sequence[int] = RISH_ORDERS) -> ShellData:
    """The participant level's translation of a 3T scan on its own grid, in memory.

    Parameters
    ----------
    source : ShellData
        b0 + shell volumes of the 3T scan (b0s first).
    region : (X, Y, Z) bool
        Voxels to rebuild (others keep the source signal).
    scale : (X, Y, Z, n_orders) float
        Scale maps lambda_l (paper Eq. 2).
    brain : (X, Y, Z) bool
        Where lambda applies; lambda = 1 elsewhere (the participant level's behaviour).

    Returns
    -------
    ShellData
        Same grid and gradients: b0 volumes unchanged, shell volumes
        ``S0 * max(sum_lm lambda_l C_lm Y_lm(g), 0)`` inside ``region`` (Eq. 3).
    """
    from ..core.signal import fit_shell_sh
    from .pipeline import ShellData
    b0 = np.arange(source.n_b0)
    shell = np.arange(source.n_b0, source.data.shape[-1])
    model = SHModel(source.bvecs[shell], sh_order_max=sh_order_max)
    s0, coeffs = fit_shell_sh(source.data, b0, shell, region, model.fit_matrix)
    lam = np.where(brain[..., None], np.asarray(scale, np.float32), np.float32(1.0))
    basis = sh_basis(source.bvecs[shell], sh_order_max)[0].astype(np.float32)
    scaled = scale_sh(coeffs[region], lam[region], model.l_values, orders)  # Eq. 3, (n_region, K)
    out = source.data.copy()
    values = out[region]  # (n_region, n_b0 + M), a copy
    values[:, shell] = np.maximum(scaled @ basis.T, 0.0) * s0[region][:, None]
    out[region] = values
    return ShellData(out, source.bvals, source.bvecs, source.affine, source.n_b0)


def score_pair(pair: ValidationPair, translators: Mapping[str, Any], truth_root: Path | None = None,
               shell: float = 1000.0, tolerance: float = 100.0,
               sh_order_max: int = 4) -> list[ScoreRow]:
    """Score the untouched 3T scan and each translator's output against the 7T scan.

    ``translators``: ``{name: method}`` with ``predict_scale_maps(rish, mask, affine)`` (the
    :mod:`bids_dmri_ldm.methods` protocol).  ``truth_root``: the raw dataset, whose
    ``derivatives/simulation`` brain mask is used when it exists (else the 7T scan's automatic
    mask).  Rows: ``reference="7T"`` (and ``"noiseless7T"`` for simulated data).
    """
    from . import discovery
    from .pipeline import (
        ShellData,
        Truth,
        load_shell,
        prepare_truth,
        score_participant,
        scored_region,
    )
    scan = discovery.SevenTScan(pair.participant, pair.target_dwi, pair.target_bval, pair.target_bvec)
    truth: Truth = prepare_truth(scan, Path(truth_root) if truth_root else pair.target_dwi.parent, "auto",
                                 shell, tolerance)
    source = load_shell(pair.source_dwi, pair.source_bval, pair.source_bvec, shell, tolerance)
    in_fov, region = scored_region(truth, source.affine, source.shape, pair.source_dwi.name)
    box = bounding_box(region, whole_if_empty=False)
    cropped = ShellData(np.ascontiguousarray(source.data[box]), source.bvals, source.bvecs,
                        source.affine @ _shift(box), source.n_b0)
    region, brain = region[box], np.asarray(pair.mask, bool)[box]
    items = [_item(pair, discovery.UNTOUCHED, cropped, region, truth, in_fov, shell, tolerance)]
    for name, method in translators.items():
        scale = method.predict_scale_maps(pair.rish, pair.mask, pair.affine).scale[box]
        translated = translate_dwi(cropped, region, scale, brain, sh_order_max)
        items.append(_item(pair, name, translated, region, truth, in_fov, shell, tolerance))
    return score_participant(truth, items)


def _shift(box: Sequence[slice]) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = [b.start for b in box]
    return matrix


def _item(pair, name, dwi, region, truth, in_fov, shell, tolerance) -> PredictionOnTruth:
    from .pipeline import PredictionOnTruth, maps_on_truth

    maps, support = maps_on_truth(dwi, region, truth, shell, tolerance)
    return PredictionOnTruth(pair.participant, pair.session, name, pair.source_dwi.name, maps, in_fov & support)


def summarise_rows(rows: Sequence[ScoreRow], model: str, reference: str = "7T") -> dict[str, Any]:
    """The validation table: mean of each column per method (and per participant), and the
    columns where ``model`` loses to ``identity``.

    Returns a JSON-ready dict (stored in the bundle's ``config.json["validation"]``).
    """
    from .report import groups
    from .scoring import summarise
    table: dict[str, Any] = {"reference": reference, "columns": list(COLUMNS), "mean": {}, "participants": {}}
    for method, ref, members in groups(rows):
        if ref != reference:
            continue
        mean, _ = summarise([r.scores for r in members], COLUMNS)
        table["mean"][method] = {c: _finite(mean[c]) for c in COLUMNS}
        table["participants"][method] = {f"sub-{r.participant}": {c: _finite(r.scores.get(c, math.nan))
                                                                  for c in COLUMNS} for r in members}
    table["n_participants"] = len({r.participant for r in rows})
    table["model"] = model
    table["loses_to_identity"] = losing_columns(table, model)
    return table


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


TIE_TOLERANCE = 1e-6
"""Relative difference below which two means tie (float32 rounding: an order a model leaves
unchanged differs from identity only in the last digits)."""


def losing_columns(table: Mapping[str, Any], model: str, baseline: str = IDENTITY) -> list[str]:
    """Columns where ``model`` is worse than ``baseline``: higher NMSE or lower SSIM (means), by more
    than :data:`TIE_TOLERANCE` relative.

    Columns that are undefined for either are left out.  An empty list means: no worse anywhere.
    """
    mean = table.get("mean", {})
    if model not in mean or baseline not in mean or model == baseline:
        return []
    worse = []
    for column in table.get("columns", COLUMNS):
        a, b = mean[model].get(column), mean[baseline].get(column)
        if a is None or b is None:
            continue
        margin = TIE_TOLERANCE * abs(b)
        if (column.startswith("nmse") and a > b + margin) or (column.startswith("ssim") and a < b - margin):
            worse.append(column)
    return worse


def column_label(column: str) -> str:
    """``nmse_L4`` -> ``NMSE L4``."""
    metric, _, name = column.partition("_")
    return f"{metric.upper()} {name}"


def table_markdown(table: Mapping[str, Any]) -> str:
    """Markdown of a validation table: one row per method (means), the model's losses named."""
    columns = table["columns"]
    lines = [f"Held-out validation participants: {table['n_participants']}; against their real 7T scan; "
             "mean over participants (NMSE ↓, SSIM ↑).", "",
             "| method | " + " | ".join(column_label(c) for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for method, values in table["mean"].items():
        cells = ["n/a" if values[c] is None else f"{values[c]:.4f}" for c in columns]
        name = f"**{method}**" if method == table["model"] else method
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    losses = table.get("loses_to_identity", [])
    lines.append("")
    if losses:
        lines.append(f"**{table['model']} loses to identity in {len(losses)} of {len(columns)} columns: "
                     f"{', '.join(column_label(c) for c in losses)}.**")
    else:
        lines.append(f"{table['model']} is not worse than identity in any column.")
    return "\n".join(lines) + "\n"


def validation_warning(model_name: str, table: Mapping[str, Any] | None) -> str | None:
    """One-line warning for a model that loses to identity on its validation pairs (or has no
    validation table), else None."""
    if table is None:
        return (f"model {model_name} has no validation table (trained without held-out pairs, or before "
                "the validation gate): nothing says it beats identity")
    losses = table.get("loses_to_identity") or []
    if not losses:
        return None
    return (f"model {model_name} loses to identity on its {table.get('n_participants', '?')} validation "
            f"participant(s) in {', '.join(column_label(c) for c in losses)} (see its MODEL_CARD.md)")

"""Evaluation tables: a TSV (per participant + mean / sd rows) and Markdown for the README.

Pure formatting: rows in, text out. Writing the text to disk (atomically) is the caller's job.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .scoring import MAP_NAMES, score_columns, summarise

REFERENCES: dict[str, str] = {
    "7T": "the participant's real 7T scan",
    "noiseless7T": "the simulator's noiseless 7T ground truth (derivatives/simulation)",
}
"""Reference kinds (``reference`` column) and how the Markdown names them."""

ID_COLUMNS: tuple[str, ...] = ("participant_id", "session", "method", "reference", "mask", "n_voxels", "coverage")
"""Leading TSV columns; the scores follow (``nmse_L0 ... ssim_FA``), then ``prediction``."""

PAPER_TABLE1: dict[str, dict[str, float]] = {
    name: dict(zip(score_columns(MAP_NAMES), values))
    for name, values in (
        ("CNN (Karayumak 2018), paper", (0.126, 0.143, 0.495, 0.053, 0.889, 0.959, 0.956, 0.958)),
        ("GAN, paper", (0.129, 0.427, 1.652, 0.118, 0.915, 0.893, 0.943, 0.902)),
        ("LDM (Zhu et al. 2024), paper", (0.105, 0.102, 0.158, 0.044, 0.922, 0.961, 0.967, 0.966)),
    )
}
"""Zhu et al. 2024, Table 1 (real HCP, 17 test subjects, mean only), shown for context with
``--paper-rows``: different data (real HCP, not simulated), so not directly comparable."""

SUMMARY_IDS = ("mean", "sd")
"""``participant_id`` of the summary rows (one pair per method and reference)."""


@dataclass
class ScoreRow:
    """Scores of one prediction against one reference."""

    participant: str
    session: str | None
    method: str
    reference: str
    mask: str
    n_voxels: int
    scores: dict[str, float]
    prediction: str = ""
    coverage: float = math.nan
    """Fraction of the scored voxels where the prediction has diffusion-weighted signal (> 0)."""


def _fmt(value, digits: int = 6) -> str:
    """TSV cell: ``digits`` significant digits, ``n/a`` for missing values."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _short(value: float) -> str:
    """Markdown number: 3 decimals as in the paper's Table 1, scientific below 0.001."""
    if not math.isfinite(value):
        return "n/a"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.3f}"


def groups(rows: Sequence[ScoreRow]) -> list[tuple[str, str, list[ScoreRow]]]:
    """Rows grouped by (method, reference), in first-seen method order, 7T before noiseless."""
    methods: list[str] = []
    for row in rows:
        if row.method not in methods:
            methods.append(row.method)
    out = []
    for method in methods:
        for reference in REFERENCES:
            members = [r for r in rows if r.method == method and r.reference == reference]
            if members:
                out.append((method, reference, members))
    return out


def to_tsv(rows: Sequence[ScoreRow], names: Sequence[str] = MAP_NAMES) -> str:
    """TSV text: one row per prediction and reference, then ``mean`` and ``sd`` rows per group.

    Missing values are ``n/a`` (BIDS tabular convention).
    """
    columns = score_columns(names)
    header = list(ID_COLUMNS) + columns + ["prediction"]
    lines = ["\t".join(header)]
    for method, reference, members in groups(rows):
        for row in members:
            ids = [f"sub-{row.participant}", row.session or "n/a", method, reference, row.mask, str(row.n_voxels),
                   _fmt(row.coverage, 4)]
            lines.append("\t".join(ids + [_fmt(row.scores.get(c, math.nan)) for c in columns] + [row.prediction]))
        mean, sd = summarise([r.scores | {"coverage": r.coverage} for r in members], [*columns, "coverage"])
        masks = "+".join(sorted({r.mask for r in members}))
        for label, values in zip(SUMMARY_IDS, (mean, sd)):
            ids = [label, "n/a", method, reference, masks, str(len(members)), _fmt(values["coverage"], 4)]
            lines.append("\t".join(ids + [_fmt(values[c]) for c in columns] + ["n/a"]))
    return "\n".join(lines) + "\n"


def _header_cells(names: Sequence[str]) -> list[str]:
    return [f"{metric.upper()} {name}" for metric in ("nmse", "ssim") for name in names]


def _mean_sd(mean: float, sd: float) -> str:
    if not math.isfinite(mean) or not math.isfinite(sd):
        return _short(mean)
    return f"{_short(mean)} ± {_short(sd)}"


def to_markdown(
    rows: Sequence[ScoreRow],
    names: Sequence[str] = MAP_NAMES,
    title: str = "Evaluation of 7T-like predictions",
    notes: Sequence[str] = (),
    paper_rows: bool = False,
) -> str:
    """Markdown: per reference, a mean ± sd table (one row per method), then per-participant tables.

    NMSE: lower is better; SSIM: higher is better. ``n`` = number of participants scored.
    ``paper_rows`` appends the paper's Table 1 rows (:data:`PAPER_TABLE1`, italic, n = 17) to the
    table against the real 7T scan, for context.
    """
    columns = score_columns(names)
    header = "| method | n | " + " | ".join(_header_cells(names)) + " |"
    rule = "|---|---|" + "---|" * len(columns)
    out = [f"## {title}", ""]
    out += [f"{note}" for note in notes]
    if notes:
        out.append("")
    grouped = groups(rows)
    for reference, description in REFERENCES.items():
        selected = [(m, members) for m, ref, members in grouped if ref == reference]
        if not selected:
            continue
        out += [f"### Against {description}", "", "Mean ± sd over participants (NMSE ↓, SSIM ↑).", "", header, rule]
        for method, members in selected:
            mean, sd = summarise([r.scores for r in members], columns)
            out.append(f"| {method} | {len(members)} | " + " | ".join(_mean_sd(mean[c], sd[c]) for c in columns) + " |")
        if paper_rows and reference == "7T" and tuple(names) == MAP_NAMES:
            for method, values in PAPER_TABLE1.items():
                out.append(f"| *{method}* | 17 | " + " | ".join(f"*{values[c]:.3f}*" for c in columns) + " |")
        out.append("")
    for method, reference, members in grouped:
        out += [f"#### Per participant: {method} vs {reference}", ""]
        out.append("| participant | session | " + " | ".join(_header_cells(names)) + " |")
        out.append("|---|---|" + "---|" * len(columns))
        for row in members:
            cells = [_short(row.scores.get(c, math.nan)) for c in columns]
            out.append(f"| sub-{row.participant} | {row.session or ''} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


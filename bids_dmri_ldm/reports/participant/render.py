"""Arrays -> HTML: the sections of one run and the report document (no derivative is read here).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from bids_dmri_ldm.io.files import atomic_write_text
from bids_dmri_ldm.reports import figures
from bids_dmri_ldm.reports.html import (
    LOGGER,
    ReportInputError,
    Section,
    figure_html,
    list_html,
    paragraph,
    render_document,
    report_section,
    table_html,
)
from bids_dmri_ldm.reports.participant.compute import (
    LATTICE_STEP,
    WM_FA_THRESHOLD,
    flatten,
    summary_numbers,
)
from bids_dmri_ldm.reports.participant.data import RunData

#: Sidecar keys shown first in the provenance table (case-insensitive substrings).
_PROVENANCE_FIRST = ("method", "model", "checksum", "sha", "t0", "guidance", "omega", "ddim",
                     "steps", "seed", "sample", "version", "runtime", "run_time", "time",
                     "device")


# --------------------------------------------------------------------------
# arrays -> HTML
# --------------------------------------------------------------------------
_INPUT_NAMES = {
    "mask": "brain mask", "mean_b0": "mean b0 (from the 7T-like DWI)",
    "rish_source": "source RISH maps", "rish_predicted": "predicted RISH maps",
    "scale": "scale maps", "uncertainty": "uncertainty map", "fa_in": "FA of the 3T input",
    "fa_out": "FA of the 7T-like output", "sidecar": "JSON sidecar",
}
# inputs loaded together: a failure of the first explains the others
_LOADED_BY = {"mean_b0": "fa_out", "evec_out": "fa_out", "evec_in": "fa_in"}


def _need(run: RunData, *names: str) -> None:
    """Raise ReportInputError naming the first missing input and why it is missing."""
    for name in names:
        if getattr(run, name) is None:
            key = name if name in run.problems else _LOADED_BY.get(name, name)
            reason = run.problems.get(key) or run.problems.get("mask") or "not found among the derivatives"
            raise ReportInputError(f"{_INPUT_NAMES.get(name, name)} not available: {reason}")


def _rish_blocks(run: RunData, index: int) -> list[str]:
    _need(run, "mask", "rish_source", "rish_predicted", "scale")
    order = run.orders[index]
    fig = figures.rish_mosaic(run.rish_source[..., index], run.rish_predicted[..., index],
                              run.scale[..., index], run.mask, order)
    return [figure_html(figures.to_png(fig), f"RISH L{order} mosaic",
                        f"RISH L{order} (paper Eq. 1) of the 3T source and of the 7T-like "
                        f"prediction on one grey scale, and the scale map λ{order} (Eq. 2) on a "
                        "diverging scale centred at 1 (red: 7T-like larger, blue: smaller). "
                        "Neurological view (patient right on the right).")]


def _fa_blocks(run: RunData) -> list[str]:
    _need(run, "mask", "fa_in", "fa_out")
    fig = figures.fa_figure(run.fa_in, run.fa_out, run.evec_in, run.evec_out, run.mask)
    return [figure_html(figures.to_png(fig), "FA and colour FA",
                        "FA (dipy TensorModel, OLS, b0 + the processed shell) of the 3T input and "
                        "the 7T-like output, their difference, and colour FA (red left-right, "
                        "green anterior-posterior, blue superior-inferior). The input is shown "
                        "on the output grid by nearest-neighbour sampling.")]


def _mask_blocks(run: RunData) -> list[str]:
    _need(run, "mask", "mean_b0")
    fig = figures.mask_overlay_figure(run.mean_b0, run.mask)
    return [figure_html(figures.to_png(fig), "brain mask over mean b0",
                        "Brain mask (red outline) over the mean b0 of the output.")]


def _uncertainty_blocks(run: RunData) -> list[str]:
    _need(run, "mask", "uncertainty")
    fig = figures.uncertainty_figure(run.uncertainty, run.mask, run.orders)
    return [figure_html(figures.to_png(fig), "uncertainty",
                        "Per-voxel standard deviation of the predicted RISH over the model's "
                        "samples (--num-samples).")]


def provenance_rows(sidecar: Mapping) -> list[tuple[str, object]]:
    """Sidecar entries for the settings table, provenance keys first."""
    flat = {k: v for k, v in flatten(sidecar).items() if "warning" not in k.lower()}

    def rank(key: str) -> int:
        low = key.lower()
        return next((i for i, s in enumerate(_PROVENANCE_FIRST) if s in low), len(_PROVENANCE_FIRST))

    return [(k, flat[k]) for k in sorted(flat, key=lambda k: (rank(k), k))]


def sidecar_warnings(sidecar: Mapping) -> list[str]:
    """Warnings recorded in a sidecar (any key containing 'warning')."""
    found: list[str] = []
    for key, value in flatten(sidecar).items():
        if "warning" in key.lower():
            if isinstance(value, (list, tuple)):
                found.extend(str(v) for v in value)
            elif value:
                found.append(str(value))
    return found


def _settings_blocks(run: RunData) -> list[str]:
    if not run.sidecar:
        raise ReportInputError("JSON sidecar not available: "
                               + run.problems.get("sidecar", "not found among the derivatives"))
    return [table_html(provenance_rows(run.sidecar), header=("setting", "value"))]


def _summary_blocks(run: RunData) -> list[str]:
    _need(run, "mask", "scale")
    rows = summary_numbers(run.scale, run.mask, run.fa_in, run.orders)
    note = ("λ medians over all brain voxels; white-matter-like voxels are brain voxels with "
            f"input FA > {WM_FA_THRESHOLD:g} among those tensor-fitted (every {LATTICE_STEP}rd "
            "voxel along each axis and the displayed slices).")
    return [table_html(rows, header=("quantity", "value")), paragraph(note, "meta")]


def _warning_blocks(run: RunData) -> list[str]:
    items = list(dict.fromkeys(run.warnings + sidecar_warnings(run.sidecar)))
    items += [f"report input {k}: {v}" for k, v in run.problems.items()]
    return [list_html(items, "warnings")]


def run_sections(run: RunData, logger: logging.Logger | None = None) -> list[Section]:
    """Sections of one run: a heading, figures, tables and warnings.

    Each part is built through :func:`report_section`, so a failure shows
    as an error message in its place and is logged.
    """
    sections = [Section(title=run.label, level=2)]
    for i, order in enumerate(run.orders):
        sections.append(report_section(f"RISH L{order}: source, 7T-like and scale map λ{order}",
                                       _rish_blocks, run, i, logger=logger))
    sections.append(report_section("FA and colour FA: input, output and difference", _fa_blocks,
                                   run, logger=logger))
    sections.append(report_section("Brain mask over the mean b0", _mask_blocks, run, logger=logger))
    if run.uncertainty is not None or "uncertainty" in run.problems:
        sections.append(report_section("Uncertainty over samples", _uncertainty_blocks, run,
                                       logger=logger))
    sections.append(report_section("Summary numbers", _summary_blocks, run, logger=logger))
    sections.append(report_section("Settings and provenance", _settings_blocks, run, logger=logger))
    sections.append(report_section("Warnings raised during the run", _warning_blocks, run,
                                   logger=logger))
    return sections


def render_participant_report(
    path: str | Path, subject_label: str, runs: Sequence[RunData],
    logger: logging.Logger | None = None,
) -> Path:
    """Write the participant report from arrays (no derivative is read).

    Parameters
    ----------
    path : path-like
        Output HTML file (written atomically).
    subject_label : str
        Label without ``sub-``.
    runs : sequence of RunData

    Returns
    -------
    Path
        The written file.
    """
    logger = logger or LOGGER
    sections: list[Section] = []
    for run in runs:
        sections.extend(run_sections(run, logger))
    if not runs:
        sections.append(Section(title="No processed run found", level=2,
                                blocks=[paragraph("No 7T-like DWI was found for this participant.")]))
    from bids_dmri_ldm import __version__

    subtitle = (f"bids-dmri-ldm {__version__} · {len(runs)} run(s) · generated "
                f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    document = render_document(f"sub-{subject_label}: 3T → 7T-like diffusion MRI", sections, subtitle)
    return atomic_write_text(path, document)

"""Participant report: ``OUTPUT_DIR/sub-<label>.html``, one section per run.

Three modules and the glue here:

- :mod:`.render`: :func:`render_participant_report` takes :class:`RunData` (arrays and
  dicts) and writes the HTML; it never reads a derivative file, so it is
  tested on synthetic arrays.
- :mod:`.load`: :func:`load_run` reads one run's derivatives by name
  (:data:`DERIVATIVE_NAMES`, the one table to change if the workflow renames
  its outputs) and the 3T source DWI named in the sidecar's ``Sources``;
  :func:`build_participant_report` and :func:`regenerate_reports` (for
  ``--reports-only``) glue the two.
- :mod:`.compute`: the summary numbers and the tensor fits; :mod:`.data`: :class:`RunData`,
  what passes from one to the other.

Every figure is built through :func:`~bids_dmri_ldm.reports.html.report_section`:
a figure that fails (odd volume, missing optional map) shows its error
message in the report and is logged; the report is still written and the
run never fails because of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from bids_dmri_ldm.reports.html import LOGGER
from bids_dmri_ldm.reports.participant.compute import (
    LATTICE_STEP,
    WM_FA_THRESHOLD,
    fit_tensor_at,
    flatten,
    lattice_voxels,
    summary_numbers,
)
from bids_dmri_ldm.reports.participant.data import RunData
from bids_dmri_ldm.reports.participant.load import (
    DERIVATIVE_NAMES,
    RUN_SUFFIX,
    _canonical_vectors,
    find_derivative,
    find_gradient_file,
    find_runs,
    load_run,
    log_warnings,
    read_voxels,
    run_prefix,
    source_key,
)
from bids_dmri_ldm.reports.participant.render import (
    provenance_rows,
    render_participant_report,
    run_sections,
    sidecar_warnings,
)


# --------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------
def _strip_sub(label: str) -> str:
    return label.removeprefix("sub-")


def build_participant_report(
    output_dir: str | Path,
    subject_label: str,
    runs_info: Iterable[str | Path | Mapping | RunData] | None = None,
    logger: logging.Logger | None = None,
    sample_files: Sequence[str | Path] = (),
    source_copies: Sequence[str | Path] = (),
    map_copies: Sequence[str | Path] = (),
) -> Path:
    """Write ``OUTPUT_DIR/sub-<label>.html`` from a participant's derivatives.

    Parameters
    ----------
    output_dir : path-like
        Derivative dataset root.
    subject_label : str
        With or without ``sub-``.
    runs_info : iterable, optional
        One item per run: the path of its ``*_desc-7Tlike_dwi.nii.gz``; or a
        dict with ``dwi`` (that path) and optionally ``source_dwi``,
        ``source_bval``, ``source_bvec``, ``warnings`` (list of str raised
        during the run), ``label``; or a ready :class:`RunData`. When None,
        every 7T-like DWI of the participant under ``output_dir``.
    logger : logging.Logger, optional
        Receives a warning per part of the report that could not be made.
    sample_files : sequence of path-like
        Samples recorded by the rebuild step while it wrote the outputs
        (:class:`~bids_dmri_ldm.interfaces.steps.ReportSamples`); a run whose 7T-like DWI is
        the file one of them was recorded for is not read again.
    source_copies : sequence of path-like
        Records of uncompressed copies of source volumes made by the load step
        (:func:`~bids_dmri_ldm.interfaces.steps.inputs.write_source_copy_record`); a run whose
        3T source is unchanged since one of them was made reads its signal from the copy.
    map_copies : sequence of path-like
        Records of the uncompressed per-shell maps made by the RISH-map step
        (:func:`~bids_dmri_ldm.interfaces.steps.write_map_copies_record`); a derivative map that
        is the recorded file (hard-linked) is read from them instead of being inflated.

    Returns
    -------
    Path
        The report. Never raises because a figure or an input failed; those
        failures appear in the report and the log.
    """
    logger = logger or LOGGER
    output_dir = Path(output_dir)
    label = _strip_sub(subject_label)
    start = time.perf_counter()
    if runs_info is None:
        runs_info = find_runs(output_dir, label)
    runs = []
    for item in runs_info:
        if isinstance(item, RunData):
            runs.append(item)
            continue
        extra = dict(item) if isinstance(item, Mapping) else {"dwi": item}
        extra.setdefault("sample_files", tuple(sample_files))
        extra.setdefault("source_copies", tuple(source_copies))
        extra.setdefault("map_copies", tuple(map_copies))
        try:
            runs.append(load_run(extra.pop("dwi"), output_dir, extra, logger))
        except Exception as exc:  # noqa: BLE001 - a bad run must not stop the report
            name = Path(str(item.get("dwi", "run") if isinstance(item, Mapping) else item)).name
            logger.warning("report: cannot read run %s: %s", name, exc)
            runs.append(RunData(label=name, problems={"run": f"{type(exc).__name__}: {exc}"}))
    path = render_participant_report(output_dir / f"sub-{label}.html", label, runs, logger)
    failed = sum(1 for r in runs for _ in r.problems)
    logger.info("report %s written in %.1f s (%d run(s), %d input problem(s))",
                path, time.perf_counter() - start, len(runs), failed)
    return path


def regenerate_reports(output_dir: str | Path, subject_labels: Iterable[str] | None = None) -> list[Path]:
    """Rebuild participant reports from existing derivatives (``--reports-only``).

    Parameters
    ----------
    output_dir : path-like
        Derivative dataset root.
    subject_labels : iterable of str, optional
        Labels with or without ``sub-``; every ``sub-*`` folder when None.

    Returns
    -------
    list of Path
        The reports written, one per participant.
    """
    output_dir = Path(output_dir)
    if subject_labels is None:
        subject_labels = sorted(p.name for p in output_dir.glob("sub-*") if p.is_dir())
    return [build_participant_report(output_dir, label) for label in subject_labels]


__all__ = [
    "DERIVATIVE_NAMES",
    "LATTICE_STEP",
    "RUN_SUFFIX",
    "RunData",
    "WM_FA_THRESHOLD",
    "_canonical_vectors",
    "build_participant_report",
    "find_derivative",
    "find_gradient_file",
    "find_runs",
    "fit_tensor_at",
    "flatten",
    "lattice_voxels",
    "load_run",
    "log_warnings",
    "provenance_rows",
    "read_voxels",
    "regenerate_reports",
    "render_participant_report",
    "run_prefix",
    "run_sections",
    "sidecar_warnings",
    "source_key",
    "summary_numbers",
]

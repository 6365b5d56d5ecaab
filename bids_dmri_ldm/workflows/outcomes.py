"""Outcome of the participant level's runs: where a run's failures are recorded, its status and
reason, the removal of partly written derivatives, the error logs and the invocation's summary.

A step that raises leaves a typed record (:class:`~bids_dmri_ldm.errors.StepFailure`, written by
:class:`~bids_dmri_ldm.interfaces.base.StepInterface`) in the run's folder of this invocation,
``<work_dir>/crash/<run workflow>/<invocation ID>/``, beside nipype's crash file: the record
classifies the failure, the crash file (traceback) is for humans and names the failure of a worker
that died (no record).
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..bidsio import derivatives as deriv
from ..interfaces.base import read_failures

if TYPE_CHECKING:  # pragma: no cover
    from ..config import RunConfig
    from .plan import RunPlan

LOGGER = logging.getLogger("bids_dmri_ldm.workflow")

STATUS_DONE = "done"
STATUS_SKIPPED = "skipped: complete"


def _crash_dir(config: RunConfig, plan: RunPlan, invocation: str) -> Path:
    """Where this invocation's crash files of the run go (read by this invocation only)."""
    return Path(config.work_dir) / "crash" / plan.wf_name / invocation


def _set_crash_dir(workflow, crash_dir: Path) -> None:
    """Crash files (for humans) and the steps' typed failure records (for :func:`_outcome`) of
    this invocation go to ``crash_dir``."""
    for node in workflow._get_all_nodes():
        node.config = {"execution": {"crashdump_dir": str(crash_dir), "crashfile_format": "txt"}}
        if hasattr(node.inputs, "outcome_file"):  # a StepInterface (not hashed: the cache stays valid)
            node.inputs.outcome_file = str(crash_dir)


def _snapshot(outputs: deriv.RunOutputs) -> dict[Path, tuple[int, int]]:
    """``{path: (inode, mtime_ns)}`` of the run's derivatives that exist now."""
    found = {}
    for path in deriv.existing_files(outputs):
        try:
            stat = path.stat()
        except OSError:
            continue
        found[path] = (stat.st_ino, stat.st_mtime_ns)
    return found


def _run_key(run) -> str:
    stem = getattr(run, "stem", None)
    return stem if stem else deriv.run_outputs(".", run.dwi, getattr(run, "entities", None)).run_id


def _outcome(plan: RunPlan, config: RunConfig, settings: dict[str, Any], invocation: str) -> tuple[str, str]:
    """Status and reason of one executed run (from this invocation's records and crash files only).

    A step that raised left a typed record (:class:`~bids_dmri_ldm.errors.StepFailure`, written
    by its interface): the run's failure is classified by it. A failure without a record (a
    worker process that died, nipype itself) is a plain failure, named from the crash file.
    """
    crash_dir = _crash_dir(config, plan, invocation)
    crash_files = sorted(crash_dir.glob("crash-*.txt"))
    failures = read_failures(crash_dir)
    if not crash_files and not failures and deriv.is_complete(plan.outputs, settings):
        _remove_empty_dirs(crash_dir)
        return STATUS_DONE, ""
    category = None
    if failures:
        error_name, message, category = failures[0].name, failures[0].message, failures[0].category
    elif crash_files:
        error_name, message = crash_reason(crash_files[0].read_text(errors="replace"))
    else:
        error_name, message = "RuntimeError", "the workflow stopped before writing all outputs"
    removed = _remove_partial(plan)
    if removed:
        LOGGER.warning("%s: removed %d partly written derivative file(s)", _run_key(plan.run), len(removed))
    if category is None:
        message = f"{error_name}: {message}"
    _write_error_log(config, plan.outputs.run_id, message, crash_files, dwi=plan.run.dwi)
    prefix = f"failed ({category}): " if category else "failed: "
    return prefix + message, message


def _remove_partial(plan: RunPlan) -> list[Path]:
    """Remove the run's derivatives when this attempt (re)wrote any of them (compared with the
    snapshot taken under the run's lock before it started: only this process wrote since)."""
    if _snapshot(plan.outputs) != plan.before:
        return deriv.remove_outputs(plan.outputs)
    return []


def _remove_empty_dirs(folder: Path) -> None:
    """Remove ``folder`` and its parent when empty (this invocation's crash folder of a run)."""
    for path in (folder, folder.parent):
        try:
            path.rmdir()
        except OSError:
            return


_EXC_LINE = re.compile(r"^((?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt))): ?(.*)$")


def crash_reason(text: str, qualified: bool = False) -> tuple[str, str]:
    """``(exception class, message)`` of the last exception in a nipype crash file's traceback,
    for the message of a failure that left no typed record (a worker that died).

    The class is its name (``InputDataError``), or with ``qualified`` its name as the traceback
    gives it (``bids_dmri_ldm.errors.InputDataError``; a builtin without its module).
    """
    found = ("RuntimeError", "unknown failure (see the crash file)")
    for line in text.splitlines():
        match = _EXC_LINE.match(line.strip())
        if match:
            name = match.group(1) if qualified else match.group(2)
            found = (name, match.group(3).strip() or match.group(2))
    return found


def _write_error_log(config: RunConfig, run_name: str, message: str, crash_files: Sequence[Path] = (),
                     dwi: str | os.PathLike | None = None) -> None:
    """``logs/<run_name>_error.log``: the reason, and each crash file with its traceback."""
    lines = ([f"run: {dwi}"] if dwi else [f"run: {run_name}"]) + [f"reason: {message}"]
    for crash in crash_files:
        lines += [f"crash file: {crash}", crash.read_text(errors="replace")]
    try:
        deriv.atomic_write_text(Path(config.output_dir) / "logs" / f"{run_name}_error.log", "\n".join(lines) + "\n")
    except OSError as err:
        LOGGER.warning("could not write the error log of %s: %s", run_name, err)


def _write_summary(config: RunConfig, statuses: dict[str, str], reasons: dict[str, str], invocation: str) -> None:
    rows = ["run\tstatus\treason"]
    for key in sorted(statuses):
        status = statuses[key].split(":", 1)[0]
        rows.append(f"{key}\t{status}\t{' '.join(reasons.get(key, '').split())}")
    try:
        deriv.atomic_write_text(Path(config.output_dir) / "logs" / f"participant_{invocation}.tsv",
                                "\n".join(rows) + "\n")
    except OSError as err:
        LOGGER.warning("could not write the run summary: %s", err)

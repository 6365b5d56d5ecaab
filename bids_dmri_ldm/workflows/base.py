"""Participant level: one nipype sub-workflow per source DWI run, run in the work directory.

:func:`run_participant` is the only place that reads the :class:`~bids_dmri_ldm.config.RunConfig`;
the workflow factories below it take explicit arguments.

Per run, before any work: the header and gradient files are checked (a bad run gets a one-line
reason and is not built), and a run whose derivatives are complete with the same settings is
skipped unless ``--overwrite``. The runs that remain are sub-workflows of one workflow, executed
with nipype's ``MultiProc`` plugin when ``--nprocs`` > 1 (``Linear`` otherwise) and cached in
``<work_dir>/bids_dmri_ldm_wf``. A failing node stops only its own run: nipype's crash file of
that run (``<work_dir>/crash/<run>/``) gives the reason; the run's partly written derivatives
are removed so nothing half-written remains, and the others finish.

Statuses returned (``{run stem: status}``): ``"done"``, ``"skipped: complete"``,
``"failed (bad-data): <reason>"``, ``"failed (cannot-write): <reason>"``, ``"failed: <reason>"``.
Each invocation also writes ``logs/participant_<time>_<pid>.tsv`` (run, status, reason) and
``logs/<run>_error.log`` (reason, crash file, traceback) for failed runs, and, when all runs have
finished, the report ``sub-<label>.html`` of every participant with a run done or complete
(:func:`write_reports`; a report failure is only logged).
"""
from __future__ import annotations

import gc
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("NIPYPE_NO_ET", "1")

from ..bids import derivatives as deriv
from ..cli.exitcodes import EX_FAILURE, EX_NOINPUT, BidsAppError, OutputError
from ..interfaces.steps import (
    InputDataError,
    InputSummary,
    check_run_inputs,
    grid_changes,
)
from ..methods import (
    NEEDS_MODEL,
    Method,
    MethodError,
    ModelNotFoundError,
    load_method,
    model_warnings,
    resolve_model_dir,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..bids.layout import DWIRun
    from ..config import RunConfig

LOGGER = logging.getLogger("bids_dmri_ldm.workflow")

STATUS_DONE = "done"
STATUS_SKIPPED = "skipped: complete"
_BAD_DATA_ERRORS = ("InputDataError", "GradientError", "ImageFileError", "BadGzipFile", "EOFError")
_WRITE_ERRORS = ("OutputWriteError", "PermissionError", "ReadOnlyFileSystemError")


@dataclass
class RunPlan:
    """Everything decided about one run before the workflow is built."""

    run: Any  # DWIRun
    outputs: deriv.RunOutputs
    summary: InputSummary
    res_label: str | None
    resolution: str | None
    sources: list[str]
    spatial_reference: str
    wf_name: str
    started: float = field(default_factory=time.time)


def run_settings(config: RunConfig, model_sha256: str | None) -> dict[str, Any]:
    """Settings recorded in every sidecar and compared on reruns (a change means: redo)."""
    return {
        "Method": str(config.method),
        "ModelSHA256": model_sha256,
        "Shell": float(config.shell),
        "ShellTolerance": float(config.shell_tolerance),
        "SHOrderMax": int(config.sh_order_max),
        "OutputResolution": None if config.output_resolution is None else float(config.output_resolution),
        "SkullStrip": bool(config.skull_strip),
    }


def method_options(config: RunConfig) -> dict[str, Any]:
    """Options handed to the method loader (used by ``ldm``; ignored by the others)."""
    return {"device": config.device, "seed": int(config.seed), "num_samples": int(config.num_samples),
            "ddim_steps": config.ddim_steps, "t0": config.t0, "guidance": config.guidance,
            "scale_reference": config.scale_reference, "scale_smoothing": config.scale_smoothing,
            "omp_nthreads": int(config.omp_nthreads)}


def _uri(path, root) -> str:
    try:
        return deriv.bids_uri(path, root)
    except ValueError:  # outside the dataset (e.g. a mask from another derivative dataset)
        return Path(path).resolve().as_uri()


def plan_run(run: DWIRun, config: RunConfig) -> RunPlan:
    """Check a run from its header/gradients and decide its output names.

    Raises
    ------
    InputDataError
        The run cannot be processed (see :func:`~bids_dmri_ldm.interfaces.steps.check_run_inputs`).
    """
    summary = check_run_inputs(run.dwi, run.bval, run.bvec, config.shell, config.shell_tolerance, config.sh_order_max)
    res_label = resolution = None
    if config.output_resolution is not None and grid_changes(summary.affine, summary.shape, config.output_resolution):
        res_label = deriv.resolution_label(config.output_resolution)
        resolution = (f"Resampled to {config.output_resolution:g} mm isotropic voxels (cubic B-spline; brain mask "
                      "linear + threshold 0.5), same field of view and axis directions as the source")
    outputs = deriv.run_outputs(config.output_dir, run.dwi, getattr(run, "entities", None), res_label)
    sources = [_uri(p, config.bids_dir) for p in (run.dwi, run.bval, run.bvec, getattr(run, "mask", None)) if p]
    wf_name = re.sub(r"[^0-9a-zA-Z]", "_", outputs.run_id) + "_wf"
    return RunPlan(run=run, outputs=outputs, summary=summary, res_label=res_label, resolution=resolution,
                   sources=sources, spatial_reference=_uri(run.dwi, config.bids_dir), wf_name=wf_name)


def init_single_run_wf(plan: RunPlan, config: RunConfig, settings: dict[str, Any]):
    """Translation + derivative writing of one run, with the run's inputs set."""
    from nipype.pipeline import engine as pe

    from .dwi import init_dwi_7tlike_wf, writes_std_map
    from .outputs import init_ds_7tlike_wf

    workflow = pe.Workflow(name=plan.wf_name)
    dwi_wf = init_dwi_7tlike_wf(
        method=str(config.method),
        model_dir=None if config.model_dir is None else str(config.model_dir),
        method_options=method_options(config),
        shell=config.shell,
        shell_tolerance=config.shell_tolerance,
        sh_order_max=config.sh_order_max,
        output_resolution=config.output_resolution if plan.res_label else None,
        skull_strip=bool(config.skull_strip),
        omp_nthreads=config.omp_nthreads,
    )
    run = plan.run
    dwi_wf.inputs.inputnode.dwi_file = str(run.dwi)
    dwi_wf.inputs.inputnode.bval_file = str(run.bval) if run.bval else None
    dwi_wf.inputs.inputnode.bvec_file = str(run.bvec) if run.bvec else None
    dwi_wf.inputs.inputnode.mask_file = str(run.mask) if getattr(run, "mask", None) else None
    ds_wf = init_ds_7tlike_wf(
        output_dir=str(config.output_dir),
        source_file=str(run.dwi),
        source_entities={k: str(v) for k, v in (getattr(run, "entities", None) or {}).items()},
        sources=plan.sources,
        spatial_reference=plan.spatial_reference,
        settings=settings,
        seed=config.seed,
        res_label=plan.res_label,
        resolution=plan.resolution,
        with_std=writes_std_map(config.method, method_options(config)),
        skull_strip=bool(config.skull_strip),
    )
    fields = ["dwi_file", "bval_file", "bvec_file", "mask_file", "rish_source_file", "rish_predicted_file",
              "scale_file", "provenance", "warnings"]
    if writes_std_map(config.method, method_options(config)):
        fields.append("rish_std_file")
    workflow.connect([(dwi_wf, ds_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in fields])])
    return workflow


def _crash_dir(config: RunConfig, plan: RunPlan) -> Path:
    return Path(config.work_dir) / "crash" / plan.wf_name


def _set_crash_dir(workflow, crash_dir: Path) -> None:
    for node in workflow._get_all_nodes():
        node.config = {"execution": {"crashdump_dir": str(crash_dir), "crashfile_format": "txt"}}


def run_participant(config: RunConfig, runs: Sequence[DWIRun]) -> dict[str, str]:
    """Translate every run; return ``{run stem: status}`` (see the module docstring).

    Raises
    ------
    bids_dmri_ldm.cli.exitcodes.OutputError
        The output directory cannot be written at all (73).
    bids_dmri_ldm.cli.exitcodes.BidsAppError
        The method cannot be loaded (unknown, model corrupt, ``ldm`` weights missing: 1; model
        not found: 66); checked once before any run starts.
    """
    started = time.time()
    try:
        deriv.init_derivatives_dataset(config.output_dir, config.bids_dir)
    except deriv.OutputWriteError as err:
        raise OutputError(str(err)) from None
    try:
        translator = load_method(config.method, config.model_dir, method_options(config))
    except MethodError as err:
        raise BidsAppError(str(err), EX_NOINPUT if isinstance(err, ModelNotFoundError) else EX_FAILURE) from None
    model_sha = getattr(getattr(translator, "model", None), "sha256", None)
    if Method(config.method) in NEEDS_MODEL:
        LOGGER.info("method %s, model %s (sha256 %s)", config.method,
                    resolve_model_dir(config.method, config.model_dir), model_sha)
    for message in model_warnings(translator):  # once here; every sidecar records it (RunWarnings)
        LOGGER.warning("%s", message)
    settings = run_settings(config, model_sha)

    statuses: dict[str, str] = {}
    reasons: dict[str, str] = {}
    plans: list[RunPlan] = []
    for run in runs:
        key = _run_key(run)
        try:
            plan = plan_run(run, config)
        except InputDataError as err:
            statuses[key], reasons[key] = "failed (bad-data): " + str(err), str(err)
            continue
        if not config.overwrite and deriv.existing_files(plan.outputs):
            if deriv.is_complete(plan.outputs, settings):
                LOGGER.info("%s: outputs complete, skipped (use --overwrite to redo)", key)
                statuses[key] = STATUS_SKIPPED
                continue
            recorded = deriv.read_settings(plan.outputs)
            if recorded is not None and recorded != settings and deriv.is_complete(plan.outputs):
                reason = (f"outputs made with other settings exist ({_settings_diff(recorded, settings)}); "
                          "rerun with --overwrite or use another output directory")
                statuses[key], reasons[key] = "failed: " + reason, reason
                continue
            LOGGER.info("%s: incomplete outputs from an earlier run are redone", key)
        plans.append(plan)

    if plans:
        _execute(plans, config, settings)
        for plan in plans:
            key = _run_key(plan.run)
            statuses[key], reasons[key] = _outcome(plan, config, settings)
    _write_summary(config, statuses, reasons, started)
    write_reports(config.output_dir, runs, statuses)
    return statuses


def _subject(run) -> str | None:
    subject = getattr(run, "subject", None)
    if subject:
        return str(subject)
    match = re.search(r"(?:^|_)sub-([0-9a-zA-Z]+)", Path(str(run.dwi)).name)
    return match.group(1) if match else None


def write_reports(output_dir: str | os.PathLike, runs: Sequence[DWIRun], statuses: dict[str, str]) -> list[Path]:
    """Write ``sub-<label>.html`` for every participant with at least one run done or complete.

    Called after all runs finished, also when some failed. A report that cannot be made is
    logged and never fails the run or touches its derivatives
    (:func:`~bids_dmri_ldm.reports.build_participant_report` already replaces a failing figure
    by its error message; anything else is caught here).

    Returns
    -------
    list of Path
        The reports written.
    """
    labels: dict[str, None] = {}
    for run in runs:
        label = _subject(run)
        if label and not statuses.get(_run_key(run), "failed").startswith("failed"):
            labels[label] = None
    written = []
    for label in labels:
        try:
            from ..reports import build_participant_report

            written.append(build_participant_report(output_dir, label))
        except Exception as err:  # noqa: BLE001 - a report never fails the run
            LOGGER.warning("sub-%s: the participant report could not be written (%s: %s); the derivatives "
                           "are complete, rerun with --reports-only to retry", label, type(err).__name__, err)
    return written


def _run_key(run) -> str:
    stem = getattr(run, "stem", None)
    return stem if stem else deriv.run_outputs(".", run.dwi, getattr(run, "entities", None)).run_id


def _settings_diff(recorded: dict, wanted: dict) -> str:
    diffs = [f"{k}: {recorded.get(k)!r} vs {wanted.get(k)!r}" for k in sorted(set(recorded) | set(wanted))
             if recorded.get(k) != wanted.get(k)]
    return "; ".join(diffs) or "unknown difference"


def _execute(plans: list[RunPlan], config: RunConfig, settings: dict[str, Any]) -> None:
    """Build one workflow with a sub-workflow per run and run it; node failures are collected
    from the crash files afterwards."""
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging
    from nipype.pipeline import engine as pe

    level = "INFO" if config.verbose >= 2 else "WARNING" if config.verbose == 1 else "CRITICAL"
    nipype_config.update_config({"logging": {"workflow_level": level, "interface_level": level,
                                             "utils_level": level},
                                 "execution": {"crashfile_format": "txt", "stop_on_first_crash": False, "poll_sleep_duration": 0.05,
                                               "remove_unnecessary_outputs": True, "create_report": False,
                                               "check_version": False}})
    nipype_logging.update_logging(nipype_config)

    top = pe.Workflow(name="bids_dmri_ldm_wf", base_dir=str(config.work_dir))
    for plan in plans:
        crash_dir = _crash_dir(config, plan)
        shutil.rmtree(crash_dir, ignore_errors=True)  # reasons of an earlier attempt are stale
        plan.started = time.time()
        run_wf = init_single_run_wf(plan, config, settings)
        _set_crash_dir(run_wf, crash_dir)
        top.add_nodes([run_wf])
    if config.nprocs > 1:
        # forkserver, not fork: a forked worker inherits torch's (OpenMP) thread pool and CUDA
        # state from the parent and can deadlock in the first threaded kernel it runs.
        plugin, plugin_args = "MultiProc", {
            "n_procs": int(config.nprocs),
            "raise_insufficient": False,
            "mp_context": "forkserver",
        }
    else:
        plugin, plugin_args = "Linear", {}
    # nipype's MultiProc calls gc.collect() on every scheduling pass; with torch, pybids and
    # sqlalchemy loaded that is ~0.7 s each. Freezing the objects alive now (they live for the
    # whole run anyway) keeps those collections to the objects made since.
    gc.freeze()
    try:
        top.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as err:  # "Workflow did not execute cleanly": per-run outcomes below
        LOGGER.debug("nipype: %s", err)
    finally:
        gc.unfreeze()


def _outcome(plan: RunPlan, config: RunConfig, settings: dict[str, Any]) -> tuple[str, str]:
    """Status and reason of one executed run."""
    crash_files = sorted(_crash_dir(config, plan).glob("crash-*.txt"))
    if not crash_files and deriv.is_complete(plan.outputs, settings):
        return STATUS_DONE, ""
    if crash_files:
        error_type, message = crash_reason(crash_files[0].read_text(errors="replace"))
    else:
        error_type, message = "RuntimeError", "the workflow stopped before writing all outputs"
    removed = _remove_partial(plan)
    if removed:
        LOGGER.warning("%s: removed %d partly written derivative file(s)", _run_key(plan.run), len(removed))
    if error_type in _BAD_DATA_ERRORS:
        category = "bad-data"
    elif error_type in _WRITE_ERRORS:
        category = "cannot-write"
    else:
        category = None
        message = f"{error_type}: {message}"
    _write_error_log(config, plan, message, crash_files)
    prefix = f"failed ({category}): " if category else "failed: "
    return prefix + message, message


def _remove_partial(plan: RunPlan) -> list[Path]:
    """Remove the run's derivatives if any was (re)written by this attempt."""
    existing = deriv.existing_files(plan.outputs)
    if any(path.stat().st_mtime >= plan.started - 1 for path in existing):
        return deriv.remove_outputs(plan.outputs)
    return []


_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)): ?(.*)$")


def crash_reason(text: str) -> tuple[str, str]:
    """``(exception class, message)`` of the last exception in a nipype crash file's traceback."""
    found = ("RuntimeError", "unknown failure (see the crash file)")
    for line in text.splitlines():
        match = _EXC_LINE.match(line.strip())
        if match:
            found = (match.group(1), match.group(2).strip() or match.group(1))
    return found


def _write_error_log(config: RunConfig, plan: RunPlan, message: str, crash_files: list[Path]) -> None:
    lines = [f"run: {plan.run.dwi}", f"reason: {message}"]
    for crash in crash_files:
        lines += [f"crash file: {crash}", crash.read_text(errors="replace")]
    try:
        deriv.atomic_write_text(Path(config.output_dir) / "logs" / f"{plan.outputs.run_id}_error.log",
                                "\n".join(lines) + "\n")
    except OSError as err:
        LOGGER.warning("could not write the error log of %s: %s", plan.outputs.run_id, err)


def _write_summary(config: RunConfig, statuses: dict[str, str], reasons: dict[str, str], started: float) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    rows = ["run\tstatus\treason"]
    for key in sorted(statuses):
        status = statuses[key].split(":", 1)[0]
        rows.append(f"{key}\t{status}\t{' '.join(reasons.get(key, '').split())}")
    try:
        deriv.atomic_write_text(Path(config.output_dir) / "logs" / f"participant_{stamp}_{os.getpid()}.tsv",
                                "\n".join(rows) + "\n")
    except OSError as err:
        LOGGER.warning("could not write the run summary: %s", err)

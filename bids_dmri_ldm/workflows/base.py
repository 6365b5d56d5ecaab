"""Participant level: one nipype sub-workflow per source DWI run, run in the work directory.

:func:`run_participant` is the only place that reads the :class:`~bids_dmri_ldm.config.RunConfig`;
the workflow factories below it take explicit arguments.

Before any work, the method's model is loaded once and compared with the run settings (a model
trained for another SH order, RISH orders or signal normalisation, or not for a ``--shell``
value, is refused, 65). Per run: the header and gradient files are checked, the fate of each
volume is decided (:func:`~bids_dmri_ldm.core.shells.plan_volumes`: the shells the model covers
are translated, the others passed through; a run none of whose shells the model covers is
refused) and the run's memory is estimated from them (a bad run gets a one-line reason and is
not built; a run that cannot fit in the memory available is refused with the number it needs),
and a run whose derivatives are complete with the same
settings is skipped unless ``--overwrite``. The runs that remain are sub-workflows of one
workflow, executed with :class:`~bids_dmri_ldm.workflows.execution.WorkerPoolPlugin` (nipype's
MultiProc scheduling; a worker that dies fails only its run) when ``--nprocs`` > 1 (``Linear``
otherwise) and cached in ``<work_dir>/bids_dmri_ldm_wf``. A failing node stops only its own run:
the step's typed record (:class:`~bids_dmri_ldm.errors.StepFailure`, written by its interface)
gives the reason and its category, nipype's crash file the traceback for humans; the run's partly
written derivatives are removed so nothing half-written remains, and the others finish.

Ownership: every invocation has an ID (``<YYYYmmdd-HHMMSS>_<pid>``). A run's derivatives are
written, judged and removed only by the process holding the run's lock
(:class:`~bids_dmri_ldm.bidsio.locks.RunLock`, ``<output_dir>/logs/locks/<run>.lock``), and its
failure records and crash files go to ``<work_dir>/crash/<run workflow>/<invocation ID>/``, read by that invocation
only. A run locked by another process (two commands over the same data) is left to it; once
this process has done its other runs it waits for the lock, then finds the run complete (and
skips it) or, when the other process failed or stopped, processes it itself.

Statuses returned (``{run stem: status}``): ``"done"``, ``"skipped: complete"``,
``"failed (bad-data): <reason>"``, ``"failed (cannot-write): <reason>"``,
``"failed (resources): <reason>"``, ``"failed: <reason>"``. Each invocation also writes
``logs/participant_<invocation ID>.tsv`` (run, status, reason) and ``logs/<run>_error.log``
(reason, crash file, traceback) for every run that failed or was refused, and, when all runs
have finished, the report ``sub-<label>.html`` of every participant with a run done or complete
(:func:`write_reports`; a report failure is only logged).
"""
from __future__ import annotations

import gc
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("NIPYPE_NO_ET", "1")


from ..bidsio import dataset as bids_dataset
from ..bidsio import derivatives as deriv
from ..bidsio.locks import LockUnavailable, RunLock
from ..core.sh import RISH_ORDERS
from ..errors import (
    EX_DATAERR,
    BidsAppError,
    FailureCategory,
    InputDataError,
    ResourceError,
)
from ..interfaces.steps import (
    ShellOptions,
)
from ..methods import (
    ModelInfo,
    inspect_model,
    model_mismatches,
    model_warnings,
)
from .outcomes import (
    STATUS_SKIPPED,
    _crash_dir,
    _outcome,
    _run_key,
    _set_crash_dir,
    _snapshot,
    _write_error_log,
    _write_summary,
)
from .plan import (
    RunPlan,
    method_options,
    plan_run,
    run_settings,
    shell_options,
)
from .resources import (
    GIB,
    MemoryEstimate,
    available_memory,
    model_weight_bytes,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..bidsio.layout import DWIRun
    from ..config import RunConfig

LOGGER = logging.getLogger("bids_dmri_ldm.workflow")


_INVOCATIONS = itertools.count(1)


def invocation_id(started: float | None = None) -> str:
    """``<YYYYmmdd-HHMMSS>_<pid>``: names what one invocation writes (summary, crash folders).

    Unique also when one process runs the participant level more than once (``-<n>`` is added
    from the second call on), so an invocation never reads an earlier one's crash files.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if started is None else started))
    number = next(_INVOCATIONS)
    return f"{stamp}_{os.getpid()}" + (f"-{number}" if number > 1 else "")


def init_single_run_wf(plan: RunPlan, config: RunConfig, settings: dict[str, Any]):
    """Translation + derivative writing of one run, with the run's inputs set."""
    from nipype.pipeline import engine as pe

    from .dwi import init_dwi_7tlike_wf, writes_std_map
    from .outputs import init_ds_7tlike_wf

    workflow = pe.Workflow(name=plan.wf_name)
    dwi_wf = init_dwi_7tlike_wf(
        method=str(config.method),
        model_dir=None if config.model_dir is None else str(config.model_dir),
        model_sha256=settings.get("ModelSHA256"),
        method_options=method_options(config),
        shell_options=plan.options.to_dict(),
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
    _set_node_memory(workflow, plan.memory)
    return workflow


#: Which memory estimate (:class:`~.resources.MemoryEstimate` step) each heavy node is scheduled with.
_NODE_MEMORY = {"load_dwi": "load", "fit_rish": "fit", "predict_scale": "model", "resample": "grid",
                "scale_sh": "grid", "rebuild": "rebuild"}


def _set_node_memory(workflow, memory: MemoryEstimate) -> None:
    """Tell MultiProc's scheduler what the heavy nodes need (``mem_gb``), so that runs in
    parallel never together exceed the memory given to it (see :func:`_execute`)."""
    for node in workflow._get_all_nodes():
        step = _NODE_MEMORY.get(node.name)
        if step in memory.steps:
            node._mem_gb = memory.steps[step] / GIB


def run_participant(config: RunConfig, runs: Sequence[DWIRun], rejected: dict[str, str] | None = None
                    ) -> dict[str, str]:
    """Translate every run; return ``{run stem: status}`` (see the module docstring).

    ``rejected`` (``{stem: reason}``) are runs the BIDS layout already refused (no bval/bvec,
    a malformed ``MagneticFieldStrength``, an invalid file name, ...): they get their status,
    summary row and error log like the runs refused here.

    Raises
    ------
    bids_dmri_ldm.errors.OutputError
        The output directory cannot be written at all (73).
    bids_dmri_ldm.errors.BidsAppError
        The method cannot be loaded (unknown, model corrupt, ``ldm`` weights missing: 1; model
        not found: 66), or its model was trained for other data (65); checked once before any
        run starts.
    """
    started = time.time()
    invocation = invocation_id(started)
    bids_dataset.init_derivatives_dataset(config.output_dir, config.bids_dir)  # OutputWriteError: 73
    statuses: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for key, reason in sorted((rejected or {}).items()):
        statuses[key], reasons[key] = "failed (bad-data): " + reason, reason
        _write_error_log(config, f"{key}_dwi", reason)
    if runs:
        # the model verified and described once, without building it (MethodError: 1, not found: 66);
        # every node that predicts scale maps loads it for use
        info = inspect_model(config.method, config.model_dir, method_options(config))
        model_dir = None if info is None else info.path
        if info is not None:
            LOGGER.info("method %s, model %s (sha256 %s)", config.method, model_dir, info.sha256)
            check_model_matches(info, config, model_dir)
        for message in model_warnings(info):  # once here; every sidecar records it (RunWarnings)
            LOGGER.warning("%s", message)
        settings = run_settings(config, None if info is None else info.sha256)
        context = _Context(config, settings, invocation, memory_limit(config), model_weight_bytes(model_dir),
                           statuses, reasons, shell_options(config, info))
        deferred = _process_runs(context, runs, wait=False)
        if deferred:
            _process_runs(context, deferred, wait=True)
    _write_summary(config, statuses, reasons, invocation)
    write_reports(config.output_dir, runs, statuses, config.work_dir)
    return statuses


def check_model_matches(translator: ModelInfo | Any, config: RunConfig, model_dir: Path | None) -> None:
    """Refuse (65) a model trained for other data than the runs give it (a ``--shell`` it was not
    trained for, SH order, RISH orders, signal normalisation), naming both; a model that records
    nothing is only warned about. Without ``--shell`` the shells are matched per run
    (:func:`plan_run`: shells the model does not cover are passed through, a run none of whose
    shells it covers is refused).
    """
    mismatches = model_mismatches(translator, config.shells, config.shell_tolerance, config.sh_order_max,
                                  RISH_ORDERS)
    if mismatches is None:
        LOGGER.warning("the %s model %s does not record the shell, SH order and RISH orders it was trained for, "
                       "so they are not checked against this run's and it is applied to every shell (retrain it "
                       "with the group level)", config.method, model_dir)
        return
    if mismatches:
        found = "; ".join(f"{what}: model {theirs}, this run {ours}" for what, theirs, ours in mismatches)
        raise BidsAppError(
            f"the {config.method} model {model_dir} was trained for other data than this run gives it ({found}); "
            "run with the model's settings, or train a model for these settings with the group level "
            "(and pass it with --model-dir)", EX_DATAERR)


def memory_limit(config: RunConfig) -> int | None:
    """Bytes one run may use: ``--mem-gb``, else the memory available now (None when unknown)."""
    mem_gb = getattr(config, "mem_gb", None)
    if mem_gb:
        return int(float(mem_gb) * GIB)
    return available_memory()[0]


@dataclass
class _Context:
    """What :func:`_process_runs` needs besides the runs (one invocation)."""

    config: Any
    settings: dict[str, Any]
    invocation: str
    memory_limit: int | None
    model_bytes: int
    statuses: dict[str, str]
    reasons: dict[str, str]
    options: ShellOptions = field(default_factory=ShellOptions)


def _process_runs(ctx: _Context, runs: Sequence[DWIRun], wait: bool) -> list[DWIRun]:
    """Plan, lock, execute and judge ``runs``; statuses go into ``ctx``.

    A run whose lock another process holds is returned (``wait=False``) or waited for
    (``wait=True``). Locks are taken in run order, so two processes waiting for each other's
    runs cannot deadlock; every lock taken here is released before returning.
    """
    config, settings = ctx.config, ctx.settings
    deferred: list[DWIRun] = []
    plans: list[RunPlan] = []
    locks: list[RunLock] = []
    seen: dict[str, str] = {}
    try:
        for run in sorted(runs, key=_run_key):
            key = _run_key(run)
            try:
                plan = plan_run(run, config, ctx.memory_limit, ctx.model_bytes, ctx.options)
            except (InputDataError, ResourceError) as err:
                _refuse(ctx, key, f"{key}_dwi", err.category, str(err))
                continue
            except Exception as err:  # noqa: BLE001 - an unforeseen problem fails this run only
                LOGGER.debug("%s: planning failed", key, exc_info=True)
                _refuse(ctx, key, f"{key}_dwi", None, f"{type(err).__name__}: {err}")
                continue
            run_id = plan.outputs.run_id
            if run_id in seen:  # two inputs would write one set of outputs: the first is processed
                other = _relative(run.dwi, config.bids_dir)
                _refuse(ctx, other, f"{run_id}_duplicate", FailureCategory.BAD_DATA,
                        f"{other}: same outputs ({run_id}) as {_relative(seen[run_id], config.bids_dir)}, "
                        "which is processed instead")
                continue
            seen[run_id] = str(run.dwi)
            lock = RunLock(config.output_dir, run_id)
            try:
                if not lock.acquire(blocking=False):
                    if not wait:
                        LOGGER.warning("%s: another process is translating this run (%s); it is waited for "
                                       "after the other runs", key, lock.holder())
                        deferred.append(run)
                        continue
                    LOGGER.warning("%s: waiting for the other process translating this run (%s) to finish",
                                   key, lock.holder())
                    lock.acquire(blocking=True)
            except LockUnavailable as err:
                _refuse(ctx, key, run_id, FailureCategory.CANNOT_WRITE, str(err))
                continue
            locks.append(lock)
            decision = _existing_outputs_decision(plan, config, settings)
            if decision is not None:
                ctx.statuses[key], ctx.reasons[key] = decision
                if decision[0].startswith("failed"):
                    _write_error_log(config, run_id, decision[1], dwi=run.dwi)
                lock.release()
                continue
            plan.before = _snapshot(plan.outputs)
            plans.append(plan)
        if plans:
            _execute(plans, config, settings, ctx.invocation)
            for plan in plans:
                key = _run_key(plan.run)
                ctx.statuses[key], ctx.reasons[key] = _outcome(plan, config, settings, ctx.invocation)
    finally:
        for lock in locks:
            lock.release()
    return deferred


def _relative(path, root) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _refuse(ctx: _Context, key: str, log_name: str, category: FailureCategory | None, reason: str) -> None:
    """Record a run refused before any work (status, reason, ``logs/<log_name>_error.log``)."""
    reason = " ".join(reason.split())
    ctx.statuses[key] = f"failed ({category}): {reason}" if category else f"failed: {reason}"
    ctx.reasons[key] = reason
    _write_error_log(ctx.config, log_name, reason)


def _existing_outputs_decision(plan: RunPlan, config: RunConfig, settings: dict[str, Any]
                               ) -> tuple[str, str] | None:
    """``(status, reason)`` when the run's existing derivatives settle it (complete: skipped;
    made with other settings: refused), None when the run is to be (re)done."""
    key = _run_key(plan.run)
    if config.overwrite or not deriv.existing_files(plan.outputs):
        return None
    if deriv.is_complete(plan.outputs, settings):
        LOGGER.info("%s: outputs complete, skipped (use --overwrite to redo)", key)
        return STATUS_SKIPPED, ""
    recorded = deriv.read_settings(plan.outputs)
    if recorded is not None and recorded != settings and deriv.is_complete(plan.outputs):
        reason = (f"outputs made with other settings exist ({_settings_diff(recorded, settings)}); "
                  "rerun with --overwrite or use another output directory")
        return "failed: " + reason, reason
    LOGGER.info("%s: incomplete outputs from an earlier run are redone", key)
    return None


def _subject(run) -> str | None:
    subject = getattr(run, "subject", None)
    if subject:
        return str(subject)
    match = re.search(r"(?:^|_)sub-([0-9a-zA-Z]+)", Path(str(run.dwi)).name)
    return match.group(1) if match else None


def write_reports(output_dir: str | os.PathLike, runs: Sequence[DWIRun], statuses: dict[str, str],
                  work_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write ``sub-<label>.html`` for every participant with at least one run done or complete.

    Called after all runs finished, also when some failed. A report that cannot be made is
    logged and never fails the run or touches its derivatives
    (:func:`~bids_dmri_ldm.reports.build_participant_report` already replaces a failing figure
    by its error message; anything else is caught here).

    ``work_dir``: where the rebuild steps left the samples they recorded for the report
    (:class:`~bids_dmri_ldm.interfaces.steps.ReportSamples`), so that the report does not
    inflate each 7T-like DWI again; a sample is used only for the exact file it was recorded for.
    There too, the load steps' records of their uncompressed copies of the source volumes
    (:func:`~bids_dmri_ldm.interfaces.steps.inputs.write_source_copy_record`), from which the
    report reads the 3T signal instead of inflating each source again; and the RISH-map steps'
    records of their uncompressed per-shell maps
    (:func:`~bids_dmri_ldm.interfaces.steps.write_map_copies_record`), from which it reads the
    maps of a derivative hard-linked from the work folder.

    Returns
    -------
    list of Path
        The reports written.
    """
    from ..interfaces.steps import MAP_COPIES, REPORT_SAMPLES, SOURCE_COPY

    found = Path(work_dir) / "bids_dmri_ldm_wf" if work_dir else None
    samples = sorted(found.rglob(REPORT_SAMPLES)) if found else []
    copies = sorted(found.rglob(SOURCE_COPY)) if found else []
    map_copies = sorted(found.rglob(MAP_COPIES)) if found else []
    labels: dict[str, None] = {}
    for run in runs:
        label = _subject(run)
        if label and not statuses.get(_run_key(run), "failed").startswith("failed"):
            labels[label] = None
    written = []
    gc.freeze()  # the modules and objects alive now outlive the reports: not rescanned by each collection
    try:
        for label in labels:
            try:
                from ..reports import build_participant_report

                written.append(build_participant_report(output_dir, label, sample_files=samples,
                                                        source_copies=copies, map_copies=map_copies))
            except Exception as err:  # noqa: BLE001 - a report never fails the run
                LOGGER.warning("sub-%s: the participant report could not be written (%s: %s); the derivatives "
                               "are complete, rerun with --reports-only to retry", label, type(err).__name__, err)
    finally:
        gc.unfreeze()
    return written


def _settings_diff(recorded: dict, wanted: dict) -> str:
    diffs = [f"{k}: {recorded.get(k)!r} vs {wanted.get(k)!r}" for k in sorted(set(recorded) | set(wanted))
             if recorded.get(k) != wanted.get(k)]
    return "; ".join(diffs) or "unknown difference"


def _run_with_frozen_heap(workflow, plugin) -> None:
    """Run ``workflow`` with the objects alive at its start frozen out of the garbage collector,
    importing meanwhile, in a background thread, what the participant reports need afterwards.

    With torch, pybids and sqlalchemy loaded, a full collection of this process takes ~0.7 s.
    Freezing the objects alive now, and the report's modules once imported (they live for the
    whole run anyway), keeps Python's own full collections to the objects made since; nipype's
    collection before every scheduling pass is limited to the youngest generation by the plugin
    (:func:`~bids_dmri_ldm.workflows.execution.young_collections_only`). The report's modules
    (matplotlib, dipy's tensor model: ~1 s on 2 cores) are imported while this process only waits
    for its workers, instead of after the workflow. An import that fails here fails again, and is
    reported, when the report is made.
    """
    lock = threading.Lock()
    running = [True]

    def _import() -> None:
        try:
            import bids_dmri_ldm.core.metrics  # noqa: F401 - dipy's TensorModel, for the report's FA
            import bids_dmri_ldm.reports  # noqa: F401
        except Exception:  # noqa: BLE001 - see the docstring
            LOGGER.debug("report modules not imported in advance", exc_info=True)
        with lock:
            if running[0]:
                gc.freeze()

    gc.freeze()
    threading.Thread(target=_import, name="import-report-modules", daemon=True).start()
    try:
        workflow.run(plugin=plugin)
    except RuntimeError as err:  # "Workflow did not execute cleanly": per-run outcomes below
        LOGGER.debug("nipype: %s", err)
    finally:
        with lock:
            running[0] = False
            gc.unfreeze()


def _execute(plans: list[RunPlan], config: RunConfig, settings: dict[str, Any], invocation: str) -> None:
    """Build one workflow with a sub-workflow per run and run it; node failures are collected
    from this invocation's crash files afterwards."""
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging
    from nipype.pipeline import engine as pe

    from .execution import POLL_SECONDS

    level = "INFO" if config.verbose >= 2 else "WARNING" if config.verbose == 1 else "CRITICAL"
    nipype_config.update_config({"logging": {"workflow_level": level, "interface_level": level,
                                             "utils_level": level},
                                 "execution": {"crashfile_format": "txt", "stop_on_first_crash": False, "poll_sleep_duration": POLL_SECONDS,
                                               "remove_unnecessary_outputs": True, "create_report": False,
                                               "check_version": False}})
    nipype_logging.update_logging(nipype_config)

    top = pe.Workflow(name="bids_dmri_ldm_wf", base_dir=str(config.work_dir))
    for plan in plans:
        run_wf = init_single_run_wf(plan, config, settings)
        _set_crash_dir(run_wf, _crash_dir(config, plan, invocation))
        top.add_nodes([run_wf])
    if config.nprocs > 1:
        from .execution import WorkerPoolPlugin

        # forkserver, not fork: a forked worker inherits torch's (OpenMP) thread pool and CUDA
        # state from the parent and can deadlock in the first threaded kernel it runs.
        limit = memory_limit(config)
        plugin_args = {"n_procs": int(config.nprocs), "raise_insufficient": False, "mp_context": "forkserver"}
        if limit is not None:  # nodes' mem_gb (their estimates) are scheduled within it
            plugin_args["memory_gb"] = max(limit / GIB, 0.5)
        plugin = WorkerPoolPlugin(plugin_args)
    else:
        plugin = "Linear"
    _run_with_frozen_heap(top, plugin)

"""``bids-dmri-ldm`` entry point: parse, validate, collect runs, run a level.

``main()`` returns the process exit status (BIDS execution spec, see :mod:`bids_dmri_ldm.errors`):
every :class:`~bids_dmri_ldm.errors.BidsAppError` becomes one line ``bids-dmri-ldm: error: <message>``
on stderr and its code; any other exception exits 1 with one line (the traceback only with
``-v``); Ctrl-C exits 130. At the participant level every run is attempted; when any failed,
the exit status (after all have finished) is 65 if every failure was bad input data, 73 if
every failure was an unwritable output or too little memory, else 1. ``--reports-only`` at the
participant level only rebuilds the reports from existing derivatives (0, or 66 when there are
none).
"""
from __future__ import annotations

import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..config import RunConfig
from ..errors import (
    EX_CANTCREAT,
    EX_DATAERR,
    EX_FAILURE,
    EX_INTERRUPTED,
    EX_NOINPUT,
    EX_OK,
    EX_USAGE,
    BadDataError,
    BidsAppError,
    NoDataError,
    OutputError,
    TemporaryFailure,
)
from ..workflows.logs import route_nipype_logs
from .parser import PROG, _build_parser, parse_args

LOGGER = logging.getLogger("bids_dmri_ldm")
_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _count_verbose(argv: Sequence[str]) -> int:
    """-v count from raw arguments, so errors raised while parsing honour it too."""
    count = 0
    for arg in argv:
        if arg == "--verbose":
            count += 1
        elif arg.startswith("-") and not arg.startswith("--") and set(arg[1:]) == {"v"}:
            count += len(arg) - 1
    return count


def setup_logging(verbose: int, log_file: Path | None = None) -> None:
    """Log to stderr (and ``log_file``).

    ``verbose`` 0: INFO from bids-dmri-ldm, warnings from libraries; 1 (``-v``): DEBUG from
    bids-dmri-ldm, INFO from libraries, tracebacks on errors; 2+ (``-vv``): DEBUG everywhere.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_bids_dmri_ldm", False):
            root.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(log_file))
        except OSError as err:  # the run can go on without a log file
            LOGGER.warning("cannot write log file %s: %s", log_file, err)
    for handler in handlers:
        handler.setFormatter(logging.Formatter(_LOG_FORMAT, "%H:%M:%S"))
        handler._bids_dmri_ldm = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    route_nipype_logs()
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING)
    LOGGER.setLevel(logging.DEBUG if verbose >= 1 else logging.INFO)
    logging.captureWarnings(True)
    if verbose == 0:
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category, module=r"(bids(\.|$)|nipype|dipy|monai)")


def _limit_threads(omp_nthreads: int, *, load_torch: bool = True) -> None:
    """Cap BLAS/OpenMP/torch threads of this process and its workers at ``--omp-nthreads``.

    ``load_torch=False``: torch's threads are set only if torch is already imported (the
    participant level's main process never uses torch: its workers import it, and importing it
    here only for this cost ~1 s of CPU at the start of every run)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(omp_nthreads))
    if not load_torch and "torch" not in sys.modules:
        return
    import torch

    torch.set_num_threads(omp_nthreads)


def _check_level_import(level: str, err: ModuleNotFoundError) -> None:
    """After importing a level's workflows failed: a clear one-line error when the package's own
    ``workflows`` modules are missing (a broken installation); otherwise return, and the caller
    re-raises the original error (a missing dependency is reported as it is)."""
    if err.name and ("bids_dmri_ldm.workflows".startswith(err.name) or err.name.startswith("bids_dmri_ldm.workflows")):
        raise BidsAppError(f"the {level} level is not available in this installation ({err.name} is missing); "
                           "reinstall bids-dmri-ldm", exit_code=EX_FAILURE) from err


def _collect(config: RunConfig, roles, allow_all_rejected: bool = False):
    """``(runs, rejected)``: the selected runs and ``{stem: reason}`` of those refused one by one.

    With ``allow_all_rejected`` a selection whose every run was refused returns no runs instead
    of raising, so that the refused runs can still be recorded (summary, error logs).
    """
    from ..bidsio.layout import collect_dwi_runs, load_layout

    layout = load_layout(config.bids_dir, config.bids_database_dir)
    rejected: dict[str, str] = {}
    try:
        runs = collect_dwi_runs(
            layout,
            participant_labels=config.participant_labels,
            session_labels=config.session_labels,
            filters=config.bids_filters,
            rejected=rejected,
            roles=roles,
        )
    except BadDataError:
        if not (allow_all_rejected and rejected):
            raise
        runs = []
    return runs, rejected


def run_participant_level(config: RunConfig) -> int:
    """Translate every selected source run; exit status per :func:`failure_exit_code` when any
    run failed or was refused (every run refused by the layout included)."""
    from ..bidsio.layout import SOURCE
    from ..bidsio.pairing import source_runs

    runs, rejected = _collect(config, roles=(SOURCE,), allow_all_rejected=True)
    runs = source_runs(runs) if runs else []
    LOGGER.info("participant level: %d source run(s): %s", len(runs),
                ", ".join(run.stem for run in runs))
    try:  # imported here: nipype and the workflows only when a level runs
        from ..workflows.base import run_participant
    except ModuleNotFoundError as err:
        _check_level_import("participant", err)
        raise
    statuses = dict(run_participant(config, runs, rejected=rejected))
    for stem, reason in rejected.items():
        statuses.setdefault(stem, f"failed (bad-data): {reason}")
    failed = {name: status for name, status in statuses.items() if status.startswith("failed")}
    for name, status in sorted(statuses.items()):
        (LOGGER.error if name in failed else LOGGER.info)("%s: %s", name, status)
    if failed:
        LOGGER.error("%d of %d run(s) failed; see the messages above and %s",
                     len(failed), len(statuses), config.output_dir / "logs")
        sys.stderr.write(f"{PROG}: error: {len(failed)} of {len(statuses)} run(s) failed: "
                         f"{', '.join(sorted(failed))}\n")
        return failure_exit_code(failed.values())
    LOGGER.info("done: outputs in %s", config.output_dir)
    return EX_OK


def failure_exit_code(failed_statuses) -> int:
    """Exit status when runs failed: 65 (data error) when every failure was bad input data,
    73 (cannot create) when every failure was an unwritable output or a lack of resources
    (memory), else 1 (a worker killed while running, or any other failure)."""
    failed_statuses = list(failed_statuses)
    if failed_statuses and all(s.startswith("failed (bad-data)") for s in failed_statuses):
        return EX_DATAERR
    if failed_statuses and all(s.startswith(("failed (cannot-write)", "failed (resources)"))
                               for s in failed_statuses):
        return EX_CANTCREAT
    return EX_FAILURE


def run_reports_only(config: RunConfig) -> int:
    """``--reports-only`` at the participant level: rebuild ``sub-<label>.html`` from the
    derivatives already in ``output_dir`` (nothing is recomputed, the input is not read).

    Returns 0, or 66 when there is nothing to report on (no 7T-like DWI of the selected
    participants in ``output_dir``).
    """
    from ..reports import regenerate_reports

    output_dir = Path(config.output_dir)
    wanted = [str(label).removeprefix("sub-") for label in (config.participant_labels or [])]
    found = sorted(p.name.removeprefix("sub-") for p in output_dir.glob("sub-*")
                   if p.is_dir() and any(p.rglob("*_desc-7Tlike_dwi.nii*")))
    labels = [label for label in wanted if label in found] if wanted else found
    for label in sorted(set(wanted) - set(found)):
        LOGGER.warning("sub-%s: no derivatives in %s, no report", label, output_dir)
    if not labels:
        raise BidsAppError(f"--reports-only: no derivatives to report on in {output_dir} "
                           "(run the participant level first)", exit_code=EX_NOINPUT)
    reports = regenerate_reports(output_dir, labels)
    LOGGER.info("--reports-only: %d report(s) written: %s", len(reports),
                ", ".join(str(path) for path in reports))
    return EX_OK


def run_group_level(config: RunConfig) -> int:
    """Check that 3T/7T pairs exist, then hand all runs to the group level (one group-level
    process per output directory and per work directory at a time: another one gets 75). A
    dataset the simulator made for held-out evaluation only (``--physics shifted``,
    :func:`~bids_dmri_ldm.bidsio.heldout.is_shifted_dataset`) is a data error (65): nothing is
    trained on it."""
    from ..bidsio.locks import LockUnavailable, RunLock

    locks = [(RunLock(config.output_dir, "group"), "output directory", config.output_dir),
             (RunLock(config.work_dir, "group", folder="locks"), "work directory", config.work_dir)]
    taken = []
    try:
        for lock, what, where in locks:
            try:
                if not lock.acquire(blocking=False):
                    raise TemporaryFailure(
                        f"another group-level process ({lock.holder()}) uses the {what} {where}; wait for it "
                        f"to finish, or use another {what}")
            except LockUnavailable as err:
                raise OutputError(str(err)) from None
            taken.append(lock)
        return _run_group_level(config)
    finally:
        for lock in taken:
            lock.release()


def _run_group_level(config: RunConfig) -> int:
    from ..bidsio.heldout import training_refusal
    from ..bidsio.pairing import pair_runs

    refusal = None if config.reports_only else training_refusal(config.bids_dir)
    if refusal:
        raise BadDataError(refusal)
    runs, rejected = _collect(config, roles=None)
    for stem, reason in rejected.items():
        LOGGER.warning("%s not used: %s", stem, reason)
    if not config.reports_only:
        try:
            pairs = pair_runs(runs)
        except NoDataError as err:  # runs were selected, but none can train a model: a data error
            raise BadDataError(str(err)) from None
        LOGGER.info("group level: %d 3T/7T pair(s) in %d participant(s)", len(pairs),
                    len({source.subject for source, _ in pairs}))
    try:
        from ..workflows.group import run_group
    except ModuleNotFoundError as err:
        _check_level_import("group", err)
        raise
    return int(run_group(config, runs))


def _run(argv: Sequence[str]) -> int:
    try:
        return _run_level(parse_args(argv, start_workers=True))
    finally:
        _discard_unused_workers()


def _run_level(config) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    setup_logging(
        config.verbose,
        config.output_dir / "logs" / f"{PROG}_{config.analysis_level}_{stamp}_{os.getpid()}.log",
    )
    LOGGER.info("%s %s: %s level, method %s, device %s", PROG, __version__,
                config.analysis_level, config.method, config.device)
    LOGGER.info("work dir: %s", config.work_dir)
    LOGGER.debug("settings: %s", config.to_dict())
    _limit_threads(config.omp_nthreads, load_torch=config.analysis_level != "participant")
    if config.reports_only and config.analysis_level == "participant":
        return run_reports_only(config)

    from ..bidsio.validate import validate_dataset

    validate_dataset(config.bids_dir, config.work_dir, skip=config.skip_bids_validation)
    if config.analysis_level == "participant":
        return run_participant_level(config)
    return run_group_level(config)


def _discard_unused_workers() -> None:
    """A method worker started with the command line and not used by a workflow is stopped
    (:func:`~bids_dmri_ldm.workflows.execution.discard_early_workers`); nothing is imported when
    no worker was started."""
    execution = sys.modules.get("bids_dmri_ldm.workflows.execution")
    if execution is not None:
        execution.discard_early_workers()


def _error_line(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the BIDS App and return its exit status (-h and --version return 0)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = _count_verbose(argv)
    if not argv:  # BIDS Apps convention: a bare call prints the usage (exit 64, never argparse's 2)
        sys.stderr.write(_build_parser().format_usage())
        _error_line(f"bids_dir, output_dir and the analysis level are required (see `{PROG} --help`)")
        return EX_USAGE
    try:
        return _run(argv)
    except SystemExit as exc:  # -h / --version (argparse exits 0)
        return exc.code if isinstance(exc.code, int) else (EX_OK if exc.code is None else EX_FAILURE)
    except BidsAppError as exc:
        if verbose:
            traceback.print_exc()
        _error_line(exc.message)
        return exc.exit_code
    except KeyboardInterrupt:
        _error_line("interrupted")
        return EX_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place unexpected errors are reported
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (rerun with -v for the traceback)"
        _error_line(f"unexpected {type(exc).__name__}: {exc}{hint}")
        return EX_FAILURE


def console_main() -> None:
    """Entry point of the ``bids-dmri-ldm`` command and of ``run.py``: :func:`main`, then exit
    without the interpreter's teardown.

    When :func:`main` returns, every output is in place (written to a temporary name and renamed)
    and closed; what the teardown would still do is free the memory of the loaded modules and
    objects (torch, dipy, nipype, pybids): ~1 s on 2 cores, measured. The exit handlers
    (:mod:`atexit`: logging's flush and close, multiprocessing's and tempfile's clean-up) run
    first, then the standard streams are flushed and the process ends with main's status.
    """
    import atexit

    code = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    console_main()

"""Command-line parser of the BIDS App.

``_build_parser()`` only builds the :mod:`argparse` parser; ``parse_args(argv)`` parses,
validates everything that can be checked before any data are read (paths, labels, filter
file, GPU) and returns a filled :class:`~bids_dmri_ldm.config.RunConfig`.

Errors are raised as :class:`~bids_dmri_ldm.errors.BidsAppError` subclasses carrying
the BIDS execution-spec exit code; argparse's own exit status 2 is never used. The checks of
the values themselves are in :mod:`bids_dmri_ldm.cli.values`.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..config import RunConfig, default_method
from ..errors import (
    UnknownAnalysisLevel,
    UsageError,
)
from ..vocabulary import ALL_STAGES, METHOD_CHOICES, PRECISIONS, SCALE_REFERENCES, STAGE_CHOICES
from .values import (
    PROG,
    check_bids_dir,
    check_temp_dir,
    default_work_dir,
    device_type,
    ensure_writable_dir,
    existing_path,
    is_within,
    load_filter_file,
    normalise_labels,
    output_gradient_files,
    train_config_file,
    unique_shells,
)

ANALYSIS_LEVELS = ("participant", "group")
#: Bounds of ``--output-resolution`` (mm): below, the output grid of a head cannot be held in
#: memory (the pre-flight estimate refuses what does not fit the machine); above, nothing of
#: the diffusion signal's anatomy is left.
MIN_RESOLUTION_MM, MAX_RESOLUTION_MM = 0.1, 20.0


class BidsArgumentParser(argparse.ArgumentParser):
    """ArgumentParser whose errors carry BIDS exit codes instead of exiting with 2."""

    def error(self, message: str):
        """Raise :class:`UsageError` (exit 64) rather than printing usage and exiting 2."""
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# --------------------------------------------------------------------------- value types
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _resolution(text: str) -> float | None:
    """``--output-resolution``: voxel size in mm (> 0), or ``native`` (-> None)."""
    if text.strip().lower() == "native":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a voxel size in mm or 'native', got {text!r}"
        ) from None
    if not MIN_RESOLUTION_MM <= value <= MAX_RESOLUTION_MM:
        raise argparse.ArgumentTypeError(
            f"must be between {MIN_RESOLUTION_MM:g} and {MAX_RESOLUTION_MM:g} mm or 'native', got {text} "
            "(finer grids need more memory than any machine: 0.1 mm over a head is ~7e9 voxels per volume)")
    return value


def _sh_order(text: str) -> int:
    value = int(text)
    if value not in (2, 4, 6, 8):
        raise argparse.ArgumentTypeError(f"must be an even order 2, 4, 6 or 8, got {text}")
    return value


# argparse names the type in its messages ("invalid <name> value: 'x'").
_positive_int.__name__ = "positive integer"
_non_negative_int.__name__ = "non-negative integer"
_positive_float.__name__ = "positive number"
_non_negative_float.__name__ = "non-negative number"
_resolution.__name__ = "resolution"
_sh_order.__name__ = "SH order"


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- the parser
def _build_parser() -> BidsArgumentParser:
    """Build (only) the argument parser; :func:`parse_args` validates the values."""
    parser = BidsArgumentParser(
        prog=PROG,
        description=(
            "Translate 3T diffusion MRI into 7T-like diffusion MRI (RISH scale maps predicted "
            "by a latent diffusion model; Zhu et al., MICCAI 2024). The participant level "
            "writes a BIDS derivatives dataset; the group level learns the model from paired "
            "3T/7T participants."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("bids_dir", type=Path, help="root of the input BIDS dataset")
    parser.add_argument(
        "output_dir", type=Path, help="root of the derivatives dataset to write (not inside bids_dir)"
    )
    parser.add_argument(
        "analysis_level",
        metavar="{participant,group}",
        help="participant: translate each 3T DWI run; group: learn from paired 3T/7T participants",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")

    sel = parser.add_argument_group("selecting data")
    sel.add_argument(
        "--participant-label", "--participant_label",
        dest="participant_label", nargs="+", metavar="LABEL",
        help="participant labels, with or without 'sub-', or one path to a text file of labels "
        "(whitespace separated, '#' comments); default: all participants",
    )
    sel.add_argument(
        "--session-label", "--session-id", "--session_label",
        dest="session_label", nargs="+", metavar="LABEL",
        help="session labels, with or without 'ses-'; default: all sessions",
    )
    sel.add_argument(
        "--bids-filter-file", type=Path, metavar="FILE",
        help="JSON file of pybids filters: {\"dwi\": {...}} narrows the DWI runs; "
        "{\"source\": {...}, \"target\": {...}} says which runs are 3T and 7T (see docs/usage.md)",
    )
    sel.add_argument(
        "--bids-database-dir", type=Path, metavar="DIR",
        help="folder for the pybids index database (reused when present; delete it after the "
        "dataset changes)",
    )
    sel.add_argument(
        "--skip-bids-validation", "--skip_bids_validation", action="store_true",
        help="do not run bids-validator-deno on the input",
    )

    perf = parser.add_argument_group("resources")
    perf.add_argument(
        "-w", "--work-dir", type=Path, metavar="DIR",
        help="working directory for intermediate results and resumption; default: 'work' "
        "beside output_dir (OUTPUT_DIR/../work), or a temporary folder when that can't be created",
    )
    perf.add_argument("--nprocs", "--n-cpus", "--n_cpus", type=_positive_int,
                      help="processes running in parallel; default: all available CPUs")
    perf.add_argument("--omp-nthreads", type=_positive_int,
                      help="threads per process (torch, BLAS); default: min(8, nprocs)")
    perf.add_argument("--mem-gb", "--mem_gb", dest="mem_gb", type=_positive_float, metavar="GB",
                      help="memory (GiB) a run may use; runs estimated to need more are refused before "
                      "any work, and parallel runs are scheduled within it; default: the memory "
                      "available (free memory, or the container's limit)")
    perf.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="where the networks run; 'cuda' fails at once without a usable GPU")
    perf.add_argument("--precision", choices=PRECISIONS, default="auto",
                      help="network arithmetic at the participant level: 'auto' is mixed precision "
                      "(bfloat16/float16) on a GPU and, on the CPU, float32 unless the bundle asks for "
                      "bfloat16 (translation.cpu_precision, set by the 'paper' config) and the CPU has "
                      "AVX512-BF16 or AMX; 'bf16' also uses bfloat16 "
                      "on the CPU (about 1.8x faster on CPUs with AVX512-BF16 or AMX, results within "
                      "bfloat16 rounding of float32); 'fp32' is float32 everywhere")

    method = parser.add_argument_group("translation")
    method.add_argument(
        "--method", choices=METHOD_CHOICES, default=None,
        help=f"how the 3T RISH maps become 7T-like (default: '{default_method()}'; the shipped models "
        "were trained on simulated data and are for demonstration only, see docs/evaluation_results.md)",
    )
    method.add_argument("--model-dir", type=Path, metavar="DIR",
                        help="model bundle to use instead of the shipped default")
    method.add_argument(
        "--output-resolution", type=_resolution, default=1.05, metavar="MM",
        help="isotropic output voxel size in mm (1.05 = the HCP 7T grid) or 'native'",
    )
    method.add_argument(
        "--skull-strip", action="store_true",
        help="set the 7T-like DWI and the RISH maps to 0 outside the brain mask (default: every voxel of "
        "the field of view keeps its signal; the mask only decides where the translation changes it)",
    )
    method.add_argument("--shell", type=_positive_float, nargs="+", default=None, metavar="B",
                        help="b-values (s/mm²) of the shells to translate; every other shell is passed "
                        "through with lambda = 1 (default: every shell the model was trained for). Group "
                        "level: the shells rish-global is fitted for (default: every shell the pairs "
                        "share); ldm and cnn train one shell (default: 1000)")
    method.add_argument("--shell-tolerance", type=_positive_float, default=100.0, metavar="B",
                        help="largest spread of b-values (s/mm²) within one shell; a shell matches a "
                        "requested, trained or output b-value within it")
    method.add_argument("--output-gradients", nargs=2, type=Path, metavar=("BVAL", "BVEC"),
                        help="write the 7T-like DWI on this FSL gradient table (b-values; bvecs relative "
                        "to the written image, which keeps the input's axes), e.g. the HCP 7T scheme: "
                        "its b0 rows take the input's mean b0, each shell must be one of the input's "
                        "(default: the input's table, volume for volume)")
    method.add_argument("--sh-order", type=_sh_order, default=4, metavar="L",
                        help="maximal spherical-harmonic order of the fit")
    method.add_argument("--seed", type=_non_negative_int, default=0,
                        help="random seed (sampling, training)")
    method.add_argument("--overwrite", action="store_true",
                        help="recompute runs whose outputs already exist")

    ldm = parser.add_argument_group("latent diffusion model (override the model bundle)")
    ldm.add_argument("--num-samples", type=_positive_int, default=1,
                     help="samples averaged per run")
    ldm.add_argument("--ddim-steps", type=_positive_int, help="DDIM steps")
    ldm.add_argument("--t0", type=_non_negative_int, nargs=3, metavar=("L0", "L2", "L4"),
                     help="inversion noise level (timestep) per RISH order")
    ldm.add_argument("--guidance", type=float, nargs=3, metavar=("L0", "L2", "L4"),
                     help="classifier-free guidance scale ω per RISH order (paper Eq. 10)")
    ldm.add_argument("--scale-reference", choices=SCALE_REFERENCES,
                     help="denominator of the scale maps λ = sqrt(predicted 7T / reference): the input "
                     "3T RISH, or the 3T RISH through the 3T VQ-VAE round trip")
    ldm.add_argument("--scale-smoothing", type=_non_negative_float, metavar="SIGMA",
                     help="Gaussian sigma (model-grid voxels) smoothing λ before it is applied; 0: none")

    group = parser.add_argument_group("group level (training)")
    group.add_argument("--config", dest="train_config", metavar="NAME|FILE",
                       help="training configuration: a built-in name ('demo', 'paper') or a JSON/YAML "
                       "file (default: demo)")
    group.add_argument("--stage", choices=STAGE_CHOICES, default=ALL_STAGES,
                       help="training stage to run")
    group.add_argument("--resume", action="store_true",
                       help="continue training from the last checkpoint in the work dir (a stage whose "
                       "settings, training data or earlier stages changed is trained again)")
    group.add_argument("--reports-only", action="store_true",
                       help="only (re)write the reports from the derivatives already in output_dir, "
                            "recomputing nothing: sub-<label>.html at the participant level, "
                            "group_training.html at the group level")

    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (repeat: -vv); tracebacks with -v")
    return parser


def start_workers_early(method: str) -> None:
    """Start the participant level's worker server, and for a learned method its method worker
    (:func:`~bids_dmri_ldm.workflows.execution.start_worker_server`), once the command line is
    known to be valid, so that their imports (~2 s, and ~0.5 s more for MONAI, on 2 cores) overlap the
    main process's own (nipype, the dataset index; not torch, see
    :func:`~bids_dmri_ldm.ml.device.resolve_device_type`) and the first steps; nothing when the
    workflows are not installed (the level then fails with its own message)."""
    try:
        from ..workflows.execution import start_worker_server
    except ModuleNotFoundError:
        return
    start_worker_server(method)


def parse_args(argv: Sequence[str] | None = None, *, start_workers: bool = False) -> RunConfig:
    """Parse and validate the command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).
    start_workers : bool
        For a participant level on more than one process, start its worker processes once the
        command line is valid (:func:`start_workers_early`); the command line's entry point does.

    Returns
    -------
    RunConfig
        Absolute paths; output, work (and database) folders exist and are writable.

    Raises
    ------
    BidsAppError
        With the exit code of the BIDS execution spec (see :mod:`bids_dmri_ldm.errors`).
    SystemExit
        Code 0 only, for ``--help`` and ``--version``.
    """
    opts = _build_parser().parse_args(argv)

    if opts.analysis_level not in ANALYSIS_LEVELS:
        raise UnknownAnalysisLevel(
            f"unknown analysis level {opts.analysis_level!r}; choose 'participant' or 'group'"
        )
    check_temp_dir()
    bids_dir = opts.bids_dir.expanduser().resolve()
    output_dir = opts.output_dir.expanduser().resolve()
    check_bids_dir(bids_dir)
    if is_within(output_dir, bids_dir):
        raise UsageError(
            f"output_dir {output_dir} is {'the same as' if output_dir == bids_dir else 'inside'} "
            f"bids_dir {bids_dir}; choose an output folder outside the input dataset"
        )
    if bids_dir in output_dir.parents or bids_dir == output_dir:
        pass  # reported above
    elif output_dir in bids_dir.parents:
        raise UsageError(
            f"bids_dir {bids_dir} is inside output_dir {output_dir}; the derivatives dataset "
            "would contain the input. Choose an output folder beside the input dataset"
        )
    if opts.work_dir is not None:
        work_dir = opts.work_dir.expanduser().resolve()
    else:
        work_dir = default_work_dir(output_dir, bids_dir)
    if is_within(work_dir, bids_dir):
        raise UsageError(
            f"work dir {work_dir} is inside bids_dir {bids_dir}; pass -w with a folder outside "
            "the input dataset"
        )
    if is_within(work_dir, output_dir):
        raise UsageError(
            f"work dir {work_dir} is inside output_dir {output_dir} (it would break the "
            "derivatives dataset); pass -w with a folder outside it"
        )

    participant_labels = normalise_labels(opts.participant_label, "sub-")
    session_labels = normalise_labels(opts.session_label, "ses-")
    filters = load_filter_file(
        opts.bids_filter_file.expanduser().resolve() if opts.bids_filter_file else None
    )
    model_dir = existing_path(opts.model_dir, "--model-dir", directory=True)
    output_gradients = output_gradient_files(opts.output_gradients)
    train_config = train_config_file(opts.train_config)

    nprocs = opts.nprocs or _available_cpus()
    omp_nthreads = opts.omp_nthreads or max(1, min(8, nprocs))
    if start_workers and opts.analysis_level == "participant" and nprocs > 1 and not opts.reports_only:
        start_workers_early(opts.method or default_method())  # its imports run beside the main process's
    device = device_type(opts.device)

    database_dir = None
    if opts.bids_database_dir is not None:
        database_dir = opts.bids_database_dir.expanduser().resolve()
        ensure_writable_dir(database_dir, "--bids-database-dir")
    ensure_writable_dir(output_dir, "output_dir")
    ensure_writable_dir(work_dir, "work dir")

    return RunConfig(
        bids_dir=bids_dir,
        output_dir=output_dir,
        analysis_level=opts.analysis_level,
        work_dir=work_dir,
        participant_labels=participant_labels,
        session_labels=session_labels,
        bids_filters=filters,
        bids_database_dir=database_dir,
        skip_bids_validation=opts.skip_bids_validation,
        nprocs=nprocs,
        omp_nthreads=omp_nthreads,
        mem_gb=opts.mem_gb,
        device=device,
        method=opts.method or default_method(),
        model_dir=model_dir,
        output_resolution=opts.output_resolution,
        skull_strip=opts.skull_strip,
        shells=unique_shells(opts.shell, opts.shell_tolerance),
        shell_tolerance=opts.shell_tolerance,
        output_gradients=output_gradients,
        sh_order_max=opts.sh_order,
        overwrite=opts.overwrite,
        seed=opts.seed,
        verbose=opts.verbose,
        num_samples=opts.num_samples,
        precision=opts.precision,
        ddim_steps=opts.ddim_steps,
        t0=list(opts.t0) if opts.t0 else None,
        guidance=list(opts.guidance) if opts.guidance else None,
        scale_reference=opts.scale_reference,
        scale_smoothing=opts.scale_smoothing,
        train_config=train_config,
        stage=opts.stage,
        resume=opts.resume,
        reports_only=opts.reports_only,
    )

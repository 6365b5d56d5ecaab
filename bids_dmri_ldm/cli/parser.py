"""Command-line parser of the BIDS App.

``_build_parser()`` only builds the :mod:`argparse` parser; ``parse_args(argv)`` parses,
validates everything that can be checked before any data are read (paths, labels, filter
file, GPU) and returns a filled :class:`~bids_dmri_ldm.config.RunConfig`.

Errors are raised as :class:`~bids_dmri_ldm.errors.BidsAppError` subclasses carrying
the BIDS execution-spec exit code; argparse's own exit status 2 is never used.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import RunConfig, default_method
from ..errors import (
    MissingInputError,
    OutputError,
    UnknownAnalysisLevel,
    UsageError,
)
from ..vocabulary import ALL_STAGES, METHOD_CHOICES, SCALE_REFERENCES, STAGE_CHOICES

PROG = "bids-dmri-ldm"
ANALYSIS_LEVELS = ("participant", "group")
#: Query names a ``--bids-filter-file`` may hold (see docs/usage.md).
FILTER_QUERIES = ("dwi", "source", "target")
#: Entities the app sets itself; a filter may not change them.
RESERVED_FILTER_KEYS = ("suffix", "extension", "return_type", "scope", "target")
#: BIDS short entity keys -> pybids entity names, to give a helpful error.
SHORT_ENTITY_NAMES = {
    "sub": "subject",
    "ses": "session",
    "acq": "acquisition",
    "rec": "reconstruction",
    "dir": "direction",
    "ce": "ceagent",
}
_LABEL_RE = re.compile(r"^[0-9a-zA-Z+]+$")
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
                       help="continue training from the last checkpoint in the work dir")
    group.add_argument("--reports-only", action="store_true",
                       help="only (re)write the reports from the derivatives already in output_dir, "
                            "recomputing nothing: sub-<label>.html at the participant level, "
                            "group_training.html at the group level")

    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (repeat: -vv); tracebacks with -v")
    return parser


# --------------------------------------------------------------------------- validation
def normalise_labels(values: Sequence[str] | None, prefix: str) -> list[str]:
    """Labels without their BIDS prefix, unique, in the given order.

    Parameters
    ----------
    values : sequence of str or None
        Labels as typed (``01``, ``sub-01``), or a single path to a text file of labels.
    prefix : {"sub-", "ses-"}

    Raises
    ------
    UsageError
        A label holds characters other than letters, digits and ``+``.
    MissingInputError
        ``values`` names a label file that cannot be read.
    """
    if not values:
        return []
    items = list(values)
    if len(items) == 1 and ("/" in items[0] or Path(items[0]).is_file()):
        items = _read_label_file(Path(items[0]))
    labels: list[str] = []
    for item in items:
        label = item.strip()
        label = label.removeprefix(prefix)
        if not _LABEL_RE.match(label):
            raise UsageError(
                f"invalid label {item!r}: BIDS labels use only letters, digits and '+'"
            )
        if label not in labels:
            labels.append(label)
    return labels


def _read_label_file(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError as err:
        raise MissingInputError(f"cannot read label file {path}: {err.strerror or err}") from None
    labels = [tok for line in text.splitlines() for tok in line.split("#", 1)[0].split()]
    if not labels:
        raise UsageError(f"label file {path} holds no labels")
    return labels


def load_filter_file(path: Path | None) -> dict[str, dict[str, Any]]:
    """Read and check a ``--bids-filter-file``.

    Accepted forms: ``{"dwi": {...}, "source": {...}, "target": {...}}`` (each optional) or a
    flat ``{entity: value}`` object, taken as the ``dwi`` query. Values are strings, numbers,
    lists of them, ``null`` (entity must be absent) or ``"*"`` (entity must be present).

    Returns
    -------
    dict
        ``{query_name: {entity: value}}`` with query names from :data:`FILTER_QUERIES`.

    Raises
    ------
    MissingInputError
        The file does not exist or cannot be read (66).
    UsageError
        The file is not a JSON object of the accepted form (64).
    """
    if path is None:
        return {}
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise MissingInputError(
            f"cannot read --bids-filter-file {path}: {err.strerror or err}"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"--bids-filter-file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(f"--bids-filter-file {path} must hold a non-empty JSON object")
    if all(isinstance(v, dict) for v in data.values()):
        unknown = sorted(set(data) - set(FILTER_QUERIES))
        if unknown:
            raise UsageError(
                f"--bids-filter-file {path}: unknown query {unknown[0]!r}; use "
                f"{', '.join(repr(q) for q in FILTER_QUERIES)}"
            )
        queries = data
    else:
        queries = {"dwi": data}
    for name, query in queries.items():
        _check_filter_query(path, name, query)
    return {name: dict(query) for name, query in queries.items()}


def _known_entities() -> set[str]:
    from bids.layout.models import Config  # pybids, only needed here

    return set(Config.load("bids").entities) | set(Config.load("derivatives").entities)


def _check_filter_query(path: Path, name: str, query: dict[str, Any]) -> None:
    entities = _known_entities()
    for key, value in query.items():
        if key in RESERVED_FILTER_KEYS or (key == "datatype" and value != "dwi"):
            raise UsageError(
                f"--bids-filter-file {path}: {name}.{key} is set by {PROG} itself; remove it"
            )
        if key in SHORT_ENTITY_NAMES:
            raise UsageError(
                f"--bids-filter-file {path}: write {SHORT_ENTITY_NAMES[key]!r} instead of {key!r}"
            )
        # Capitalised keys are sidecar metadata (e.g. MagneticFieldStrength), which pybids
        # can filter on too.
        if key not in entities and not key[:1].isupper():
            raise UsageError(
                f"--bids-filter-file {path}: unknown entity {key!r} in {name!r}"
            )
        values = value if isinstance(value, list) else [value]
        if not all(v is None or isinstance(v, (str, int, float)) for v in values):
            raise UsageError(
                f"--bids-filter-file {path}: {name}.{key} must be a string, number, list, or null"
            )


def _is_within(path: Path, parent: Path) -> bool:
    """Whether ``path`` equals ``parent`` or lies inside it (both resolved)."""
    return path == parent or parent in path.parents


def _check_bids_dir(bids_dir: Path) -> None:
    try:
        if not bids_dir.exists():
            raise MissingInputError(f"bids_dir {bids_dir} does not exist")
        if not bids_dir.is_dir():
            raise MissingInputError(f"bids_dir {bids_dir} is not a directory")
        if not (bids_dir / "dataset_description.json").is_file():
            raise MissingInputError(
                f"bids_dir {bids_dir} is not a BIDS dataset (no dataset_description.json at its root)"
            )
    except PermissionError as err:  # a folder on the way is not readable by this user
        raise MissingInputError(f"bids_dir {bids_dir} cannot be read by this user (uid {os.getuid()}): "
                                f"{err.strerror}") from None


def _ensure_writable_dir(path: Path, what: str) -> None:
    """Create ``path`` if needed and prove it is writable by writing a file (73 otherwise)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputError(
            f"cannot write to the {what} {path}: {err.strerror or err}; choose a writable location"
        ) from None


def _check_temp_dir() -> None:
    """A writable temporary folder is needed (worker processes, the validator); refuse (73)
    before any work without one, saying what to mount."""
    try:
        tempfile.gettempdir()
    except FileNotFoundError:
        raise OutputError(
            "no writable temporary folder ($TMPDIR, /tmp, /var/tmp, /usr/tmp and the current folder "
            "were tried): in a read-only container mount one (docker run --read-only --tmpfs /tmp ...; "
            "Apptainer binds /tmp itself), or set TMPDIR to a writable folder") from None


def _default_work_dir(output_dir: Path, bids_dir: Path) -> Path:
    """``OUTPUT_DIR/../work``, or a temporary folder when that is unusable."""
    candidate = output_dir.parent / "work"
    if not _is_within(candidate, bids_dir) and not _is_within(candidate, output_dir):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK | os.X_OK):
                return candidate
        except OSError:
            pass
    return Path(tempfile.gettempdir()).resolve() / f"{PROG}-work"


def _resolve_device(requested: str) -> str:
    from ..ml.device import DeviceUnavailableError, resolve_device

    try:
        return resolve_device(requested).type
    except DeviceUnavailableError as err:
        raise UsageError(str(err)) from None


def parse_args(argv: Sequence[str] | None = None) -> RunConfig:
    """Parse and validate the command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

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
    _check_temp_dir()
    bids_dir = opts.bids_dir.expanduser().resolve()
    output_dir = opts.output_dir.expanduser().resolve()
    _check_bids_dir(bids_dir)
    if _is_within(output_dir, bids_dir):
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
        work_dir = _default_work_dir(output_dir, bids_dir)
    if _is_within(work_dir, bids_dir):
        raise UsageError(
            f"work dir {work_dir} is inside bids_dir {bids_dir}; pass -w with a folder outside "
            "the input dataset"
        )
    if _is_within(work_dir, output_dir):
        raise UsageError(
            f"work dir {work_dir} is inside output_dir {output_dir} (it would break the "
            "derivatives dataset); pass -w with a folder outside it"
        )

    participant_labels = normalise_labels(opts.participant_label, "sub-")
    session_labels = normalise_labels(opts.session_label, "ses-")
    filters = load_filter_file(
        opts.bids_filter_file.expanduser().resolve() if opts.bids_filter_file else None
    )
    model_dir = _existing_path(opts.model_dir, "--model-dir", directory=True)
    output_gradients = _output_gradients(opts.output_gradients)
    train_config = _train_config(opts.train_config)

    nprocs = opts.nprocs or _available_cpus()
    omp_nthreads = opts.omp_nthreads or max(1, min(8, nprocs))
    device = _resolve_device(opts.device)

    database_dir = None
    if opts.bids_database_dir is not None:
        database_dir = opts.bids_database_dir.expanduser().resolve()
        _ensure_writable_dir(database_dir, "--bids-database-dir")
    _ensure_writable_dir(output_dir, "output_dir")
    _ensure_writable_dir(work_dir, "work dir")

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
        shells=_unique_shells(opts.shell, opts.shell_tolerance),
        shell_tolerance=opts.shell_tolerance,
        output_gradients=output_gradients,
        sh_order_max=opts.sh_order,
        overwrite=opts.overwrite,
        seed=opts.seed,
        verbose=opts.verbose,
        num_samples=opts.num_samples,
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


def _unique_shells(values: Sequence[float] | None, tolerance: float) -> list[float] | None:
    """``--shell`` values, ascending; two within the tolerance name one shell (64)."""
    if values is None:
        return None
    shells = sorted(float(b) for b in values)
    for low, high in zip(shells, shells[1:]):
        if high - low <= tolerance:
            raise UsageError(f"--shell {low:g} and {high:g} are within --shell-tolerance {tolerance:g} s/mm² "
                             "of each other: they name one shell")
    return shells


def _output_gradients(paths: Sequence[Path] | None) -> tuple[Path, Path] | None:
    """``--output-gradients BVAL BVEC``: both files exist (66) and hold a well-formed FSL table
    (64: unreadable, a count mismatch between them, non-unit directions, b-values in a wrong unit)."""
    if paths is None:
        return None
    from ..core.gradients import GradientError
    from ..core.shells import load_output_table

    bval, bvec = (_existing_path(Path(p), "--output-gradients", directory=False) for p in paths)
    try:
        load_output_table(bval, bvec)
    except GradientError as err:
        raise UsageError(f"--output-gradients {bval.name} {bvec.name}: {err}") from None
    return bval, bvec


_BUILTIN_TRAIN_CONFIGS = Path(__file__).resolve().parents[1] / "ml" / "configs"


def _train_config(value: str | None) -> Path | None:
    """``--config``: a built-in configuration name (``ml/configs/<name>.json``) or an existing file."""
    if value is None:
        return None
    builtin = _BUILTIN_TRAIN_CONFIGS / f"{value}.json"
    if Path(value).name == value and not Path(value).suffix and builtin.is_file():
        return builtin
    return _existing_path(Path(value), "--config", directory=False)


def _existing_path(path: Path | None, option: str, directory: bool) -> Path | None:
    if path is None:
        return None
    path = path.expanduser().resolve()
    ok = path.is_dir() if directory else path.is_file()
    if not ok:
        kind = "folder" if directory else "file"
        raise MissingInputError(f"{option} {path} does not exist or is not a {kind}")
    return path

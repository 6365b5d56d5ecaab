"""Validation of the command line's values, before any data are read.

Labels, the ``--bids-filter-file``, the input, output and work folders, the temp folder, the
device, ``--shell``, ``--output-gradients``, ``--config`` and the model folder: each bad value
is one clear error with its BIDS exit code (usage 64, missing input 66, cannot write 73).
Called by :func:`bids_dmri_ldm.cli.parser.parse_args`.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import (
    MissingInputError,
    OutputError,
    UsageError,
)

PROG = "bids-dmri-ldm"
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


def is_within(path: Path, parent: Path) -> bool:
    """Whether ``path`` equals ``parent`` or lies inside it (both resolved)."""
    return path == parent or parent in path.parents


def check_bids_dir(bids_dir: Path) -> None:
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


def ensure_writable_dir(path: Path, what: str) -> None:
    """Create ``path`` if needed and prove it is writable by writing a file (73 otherwise)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputError(
            f"cannot write to the {what} {path}: {err.strerror or err}; choose a writable location"
        ) from None


def check_temp_dir() -> None:
    """A writable temporary folder is needed (worker processes, the validator); refuse (73)
    before any work without one, saying what to mount."""
    try:
        tempfile.gettempdir()
    except FileNotFoundError:
        raise OutputError(
            "no writable temporary folder ($TMPDIR, /tmp, /var/tmp, /usr/tmp and the current folder "
            "were tried): in a read-only container mount one (docker run --read-only --tmpfs /tmp ...; "
            "Apptainer binds /tmp itself), or set TMPDIR to a writable folder") from None


def default_work_dir(output_dir: Path, bids_dir: Path) -> Path:
    """``OUTPUT_DIR/../work``, or a temporary folder when that is unusable."""
    candidate = output_dir.parent / "work"
    if not is_within(candidate, bids_dir) and not is_within(candidate, output_dir):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK | os.X_OK):
                return candidate
        except OSError:
            pass
    return Path(tempfile.gettempdir()).resolve() / f"{PROG}-work"


def device_type(requested: str) -> str:
    from ..ml.device import DeviceUnavailableError, resolve_device_type

    try:
        return resolve_device_type(requested)
    except DeviceUnavailableError as err:
        raise UsageError(str(err)) from None


def unique_shells(values: Sequence[float] | None, tolerance: float) -> list[float] | None:
    """``--shell`` values, ascending; two within the tolerance name one shell (64)."""
    if values is None:
        return None
    shells = sorted(float(b) for b in values)
    for low, high in zip(shells, shells[1:]):
        if high - low <= tolerance:
            raise UsageError(f"--shell {low:g} and {high:g} are within --shell-tolerance {tolerance:g} s/mm² "
                             "of each other: they name one shell")
    return shells


def output_gradient_files(paths: Sequence[Path] | None) -> tuple[Path, Path] | None:
    """``--output-gradients BVAL BVEC``: both files exist (66) and hold a well-formed FSL table
    (64: unreadable, a count mismatch between them, non-unit directions, b-values in a wrong unit)."""
    if paths is None:
        return None
    from ..core.gradients import GradientError
    from ..core.shells import load_output_table

    bval, bvec = (existing_path(Path(p), "--output-gradients", directory=False) for p in paths)
    try:
        load_output_table(bval, bvec)
    except GradientError as err:
        raise UsageError(f"--output-gradients {bval.name} {bvec.name}: {err}") from None
    return bval, bvec


_BUILTIN_TRAIN_CONFIGS = Path(__file__).resolve().parents[1] / "ml" / "configs"


def train_config_file(value: str | None) -> Path | None:
    """``--config``: a built-in configuration name (``ml/configs/<name>.json``) or an existing file."""
    if value is None:
        return None
    builtin = _BUILTIN_TRAIN_CONFIGS / f"{value}.json"
    if Path(value).name == value and not Path(value).suffix and builtin.is_file():
        return builtin
    return existing_path(Path(value), "--config", directory=False)


def existing_path(path: Path | None, option: str, directory: bool) -> Path | None:
    if path is None:
        return None
    path = path.expanduser().resolve()
    ok = path.is_dir() if directory else path.is_file()
    if not ok:
        kind = "folder" if directory else "file"
        raise MissingInputError(f"{option} {path} does not exist or is not a {kind}")
    return path

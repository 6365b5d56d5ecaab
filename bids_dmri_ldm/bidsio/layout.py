"""BIDS input: pybids queries -> :class:`DWIRun` records and their 3T/7T roles.

The runs' pairing is in :mod:`~.pairing`, the gradient-file lookup in :mod:`~.gradients`.

The participant level processes *source* (3T) runs; the group level pairs source and
*target* (7T) runs of the same participant. Roles come from ``MagneticFieldStrength`` in the
(inherited) JSON sidecar: below :data:`SOURCE_MAX_FIELD_STRENGTH` tesla is a source run,
at or above it a target run. Datasets without ``MagneticFieldStrength`` say which runs are
which with a ``--bids-filter-file``::

    {"source": {"acquisition": "3T"}, "target": {"acquisition": "7T"}}

(any pybids entities or sidecar keys), or, for the participant level only, with a ``dwi``
query selecting the 3T runs (``{"dwi": {"session": "3T"}}``): runs of unknown field strength
that a ``dwi`` filter selected are taken as source runs.

Exit codes (see :mod:`bids_dmri_ldm.errors`): a participant or session label absent
from the dataset is *missing input* (66); labels/filters that exist but select no DWI run,
or a group level without any 3T/7T pair, is *no data* (18); a run without bval/bvec or with a
malformed field strength is *bad data* (65).
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadDataError, MissingInputError, NoDataError, UsageError
from .gradients import GradientIndex, gradient_file

LOGGER = logging.getLogger("bids_dmri_ldm.bids")  # the logger name of the log lines, unchanged

#: Runs acquired below this field strength (T) are source (3T-like) runs; others are targets.
SOURCE_MAX_FIELD_STRENGTH = 5.0
DWI_EXTENSIONS = (".nii", ".nii.gz")
SOURCE, TARGET = "source", "target"

#: pybids entity name -> BIDS key, in the order BIDS writes DWI file names.
DWI_ENTITY_KEYS = {
    "subject": "sub",
    "session": "ses",
    "acquisition": "acq",
    "ceagent": "ce",
    "reconstruction": "rec",
    "direction": "dir",
    "run": "run",
    "echo": "echo",
    "part": "part",
    "chunk": "chunk",
}
#: Entities that name a derivative file, not the run it derives from.
_DERIVATIVE_ENTITIES = ("space", "res", "den", "desc", "model")
_NOT_MATCHED = ("suffix", "extension", "datatype", "desc")


@dataclass(frozen=True)
class DWIRun:
    """One diffusion run with everything needed to read it.

    Attributes
    ----------
    dwi : Path
        The 4D NIfTI image (X, Y, Z, N).
    bval, bvec : Path
        FSL-style gradient files found by the inheritance principle (may live at the
        dataset root, e.g. ``dwi.bval``).
    metadata : dict
        The merged JSON sidecars (inheritance principle), as pybids returns them.
    entities : dict
        pybids entities of ``dwi`` (``subject``, ``session``, ``acquisition``, ``run``,
        ``direction``, ...; ``suffix``/``extension``/``datatype`` included).
    mask : Path or None
        Brain mask of the run from a derivatives input (``desc-brain_mask``), else None
        (the workflow computes one).
    field_strength : float or None
        ``MagneticFieldStrength`` in tesla, None when the sidecars lack it.
    role : {"source", "target"} or None
        From the field strength, or from the filter file when that is unknown.
    """

    dwi: Path
    bval: Path
    bvec: Path
    metadata: dict = field(default_factory=dict, hash=False, compare=False)
    entities: dict = field(default_factory=dict, hash=False)
    mask: Path | None = None
    field_strength: float | None = None
    role: str | None = None

    @property
    def subject(self) -> str:
        """Participant label without ``sub-``."""
        return str(self.entities["subject"])

    @property
    def session(self) -> str | None:
        """Session label without ``ses-``, or None."""
        value = self.entities.get("session")
        return None if value is None else str(value)

    @property
    def stem(self) -> str:
        """BIDS name stem of the run without suffix, e.g. ``sub-01_ses-1_acq-3T_run-1``.

        Built from the raw-data entities only (``space``/``desc`` of a derivatives input are
        left out), in BIDS order; unique per run within a dataset of raw DWI.
        """
        return bids_stem(self.entities)

    def __str__(self) -> str:  # used in log lines
        return self.stem


def bids_stem(entities: Mapping[str, Any]) -> str:
    """``sub-<s>[_ses-<t>][_acq-<a>]...`` from pybids entities (raw-data entities only)."""
    parts = []
    for name, key in DWI_ENTITY_KEYS.items():
        value = entities.get(name)
        if value is not None and value != "":
            parts.append(f"{key}-{_format_label(value)}")
    return "_".join(parts)


def _format_label(value: Any) -> str:
    # pybids returns run indices as PaddedInt, which keeps the zero padding in str().
    return str(value)


# --------------------------------------------------------------------------- layout
def load_layout(bids_dir: str | Path, database_dir: str | Path | None = None):
    """Index ``bids_dir`` with pybids (no pybids validation; the official validator runs apart).

    Parameters
    ----------
    bids_dir : path
        Dataset root (raw, or a derivatives dataset such as qsiprep's output).
    database_dir : path, optional
        Folder of a pybids SQLite index: reused when present, written otherwise. Delete it when
        the dataset changes.

    Returns
    -------
    bids.BIDSLayout

    Raises
    ------
    MissingInputError
        ``bids_dir`` is not a readable BIDS dataset (66).
    """
    from bids import BIDSLayout  # imported here: pybids is slow to import

    bids_dir = Path(bids_dir)
    if not (bids_dir / "dataset_description.json").is_file():
        raise MissingInputError(
            f"{bids_dir} is not a BIDS dataset (no dataset_description.json at its root)"
        )
    try:
        layout = BIDSLayout(
            str(bids_dir),
            validate=False,
            database_path=None if database_dir is None else str(database_dir),
        )
    except Exception as err:  # pybids raises a variety of errors on unreadable datasets
        raise MissingInputError(f"cannot index BIDS dataset {bids_dir}: {err}") from err
    # A saved pybids database carries its own root and silently replaces ``bids_dir``.
    if Path(layout.root).resolve() != bids_dir.resolve():
        raise UsageError(
            f"--bids-database-dir {database_dir} indexes another dataset ({layout.root}); "
            "delete it or pass a different folder"
        )
    return layout


def _pybids_filters(query: Mapping[str, Any]) -> dict[str, Any]:
    """Filter-file values to pybids ones: ``null`` -> ``Query.NONE``, ``"*"`` -> ``Query.ANY``."""
    from bids.layout import Query

    out = {}
    for key, value in query.items():
        if value is None:
            out[key] = Query.NONE
        elif value == "*":
            out[key] = Query.ANY
        else:
            out[key] = value
    return out


def _labels(layout, entity: str, **scope) -> list[str]:
    """The values of ``entity`` (``subject``/``session``) in the dataset's files.

    Written instead of pybids ``get_sessions``: when ``participants.tsv`` has a ``sessions``
    column (as the simulator writes), pybids returns that column's description (a dict) as a
    session and finds no session for a participant.
    """
    values = layout.get(return_type="id", target=entity, **scope)
    return sorted({str(v) for v in values if isinstance(v, (str, int))})


def _check_labels(requested: Sequence[str], available: Sequence[str], what: str, flag: str):
    missing = [label for label in requested if label not in available]
    if missing:
        shown = ", ".join(sorted(available)[:20]) or "none"
        raise MissingInputError(
            f"{what} label(s) {', '.join(missing)} not found in the dataset (available: "
            f"{shown}); check {flag}"
        )


def _dwi_query(participant_labels, session_labels, dwi_filter) -> dict[str, Any]:
    query = dict(_pybids_filters(dwi_filter))
    query.pop("datatype", None)
    for name, labels in (("subject", participant_labels), ("session", session_labels)):
        if not labels:
            continue
        if name in query:  # both the command line and the filter file select: intersect
            allowed = query[name] if isinstance(query[name], list) else [query[name]]
            labels = [label for label in labels if label in [str(a) for a in allowed]]
            if not labels:
                raise NoDataError(
                    f"--{'participant' if name == 'subject' else 'session'}-label and the "
                    f"filter file's {name} select no common {name}"
                )
        query[name] = list(labels)
    query.update(suffix="dwi", extension=list(DWI_EXTENSIONS))
    return query


def _describe_query(query: Mapping[str, Any]) -> str:
    shown = {k: v for k, v in query.items() if k not in ("suffix", "extension")}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "no filter"


def collect_dwi_runs(
    layout,
    participant_labels: Sequence[str] = (),
    session_labels: Sequence[str] = (),
    filters: Mapping[str, Mapping[str, Any]] | None = None,
    rejected: dict[str, str] | None = None,
    roles: Sequence[str] | None = None,
) -> list[DWIRun]:
    """Every DWI run (``suffix=dwi``, ``.nii``/``.nii.gz``) of the selected data.

    Parameters
    ----------
    layout : bids.BIDSLayout
    participant_labels, session_labels : sequence of str
        Labels without ``sub-``/``ses-``; empty selects all.
    filters : dict, optional
        The parsed ``--bids-filter-file`` (``{"dwi": {...}, "source": {...}, "target": {...}}``).
    rejected : dict, optional
        When given, runs that cannot be used (no bval/bvec, bad field strength) are recorded
        here as ``{stem: reason}`` and the others returned; when None the first such run
        raises :class:`BadDataError`.
    roles : sequence of {"source", "target"}, optional
        Keep only runs of these roles (runs of unknown role are kept, so that
        :func:`source_runs` can say what to do); e.g. ``("source",)`` at the participant
        level, where the 7T runs are not read.

    Returns
    -------
    list of DWIRun
        Sorted by file path.

    Raises
    ------
    MissingInputError
        A requested participant or session label does not exist (66).
    NoDataError
        The labels and filters select no DWI run (18).
    BadDataError
        A run lacks its bval/bvec or has a malformed ``MagneticFieldStrength`` (65), or
        every selected run is unusable.
    """
    filters = dict(filters or {})
    participant_labels = list(participant_labels or [])
    session_labels = list(session_labels or [])
    _check_labels(participant_labels, _labels(layout, "subject"), "participant", "--participant-label")
    if session_labels:
        scope = {"subject": participant_labels} if participant_labels else {}
        available = _labels(layout, "session", **scope)
        _check_labels(session_labels, available, "session", "--session-label")

    query = _dwi_query(participant_labels, session_labels, filters.get("dwi", {}))
    files = layout.get(return_type="object", invalid_filters="allow", **query)
    if not files:
        raise NoDataError(
            f"no DWI run (suffix 'dwi', .nii/.nii.gz) matches the selection "
            f"({_describe_query(query)}) in {layout.root}; check the labels and --bids-filter-file"
        )
    role_paths = {
        role: _matching_paths(layout, query, filters[role]) for role in (SOURCE, TARGET)
        if role in filters
    }
    gradients = GradientIndex.from_layout(layout)
    runs = []
    stems: dict[str, str] = {}
    for bids_file in unique_files(files, layout.root):
        stem = bids_stem(bids_file.get_entities())
        try:
            invalid = invalid_name(bids_file.path)
            if invalid:
                stem = _name_stem(bids_file.path)
                raise BadDataError(invalid)
            if stem in stems:
                other = stems[stem]
                stem = _name_stem(bids_file.path)
                raise BadDataError(f"{_relative(bids_file.path, layout.root)} has the same entities as "
                                   f"{other} (same outputs); rename one of them or leave it out with "
                                   "--bids-filter-file")
            run = _make_run(layout, gradients, bids_file, role_paths, "dwi" in filters, roles)
            if run is not None:
                stems[stem] = _relative(bids_file.path, layout.root)
                runs.append(run)
        except BadDataError as err:
            if rejected is None:
                raise
            LOGGER.error("%s", err)
            rejected[stem] = str(err)
    if not runs and rejected:
        raise BadDataError(f"no usable DWI run: {next(iter(rejected.values()))}")
    if not runs:
        raise NoDataError(
            f"none of the {len(files)} selected DWI run(s) is a {' or '.join(roles or [])} run"
            " (MagneticFieldStrength below/above "
            f"{SOURCE_MAX_FIELD_STRENGTH:g} T); check the selection and --bids-filter-file"
        )
    return runs


_NAME_PART = re.compile(r"^([a-zA-Z]+)-(.*)$")
_LABEL = re.compile(r"^[0-9a-zA-Z+]+$")


def invalid_name(path: str | Path) -> str | None:
    """Why a DWI file name is not a valid BIDS name (an entity label with characters other than
    letters, digits and ``+``, e.g. ``acq-é``), or None. pybids skips such an entity, so the run
    would silently take the name (and the outputs) of another."""
    name = Path(path).name
    stem = name.split(".", 1)[0]
    for part in stem.split("_")[:-1]:
        match = _NAME_PART.match(part)
        if match is None:
            return f"{name}: {part!r} is not a BIDS key-label pair (such as acq-label); rename the file"
        if not _LABEL.match(match.group(2)):
            return (f"{name}: the label {match.group(2)!r} of {match.group(1)}- holds characters other than "
                    "letters, digits and '+'; rename the file or leave it out with a .bidsignore entry")
    return None


def _name_stem(path: str | Path) -> str:
    """File name without extension and suffix (``sub-01_acq-x`` of ``sub-01_acq-x_dwi.nii.gz``)."""
    stem = Path(path).name.split(".", 1)[0]
    return stem.rsplit("_", 1)[0] if "_" in stem else stem


def _relative(path: str | Path, root: str | Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def unique_files(files, root: str | Path) -> list:
    """``files`` (pybids file objects) sorted by path, each real file once.

    A directory symlink that points back up the tree (a loop) makes pybids index the same files
    again under ever longer paths (``sub-01/dwi/loop/dwi/loop/...``); they are left out (logged),
    keeping the shortest path of each real file. Only the folders are resolved: files that are
    themselves symlinks (git-annex, DataLad) stay distinct even when their contents are one object.
    """
    by_real: dict[tuple[str, str], Any] = {}
    for bids_file in sorted(files, key=lambda f: (len(f.path), f.path)):
        path = Path(bids_file.path)
        by_real.setdefault((os.path.realpath(path.parent), path.name), bids_file)
    kept = sorted(by_real.values(), key=lambda f: f.path)
    dropped = len(files) - len(kept)
    if dropped:
        example = next(f.path for f in files if f not in kept)
        from .validate import shorten

        LOGGER.warning("%d DWI file path(s) lead to files already found (directory symlinks, e.g. %s); "
                       "each file is used once", dropped, shorten(_relative(example, root)))
    return kept


def _matching_paths(layout, query: Mapping[str, Any], role_filter: Mapping[str, Any]) -> set[str]:
    role_query = dict(query)
    role_query.update(_pybids_filters(role_filter))
    role_query.pop("datatype", None)
    return {f.path for f in layout.get(return_type="object", invalid_filters="allow", **role_query)}


def _make_run(layout, gradients, bids_file, role_paths, dwi_filtered, roles) -> DWIRun | None:
    path = bids_file.path
    entities = dict(bids_file.get_entities())
    stem = bids_stem(entities)
    metadata = dict(layout.get_metadata(path))
    strength = _field_strength(metadata, stem)
    role = _role(path, strength, role_paths, dwi_filtered)
    if roles is not None and role is not None and role not in roles:
        LOGGER.debug("%s: %s run (%s T) not used here", stem, role, strength)
        return None
    bval = gradient_file(gradients, bids_file, "bval", stem)
    bvec = gradient_file(gradients, bids_file, "bvec", stem)
    mask = find_brain_mask(layout, entities) if getattr(layout, "is_derivative", False) else None
    return DWIRun(
        dwi=Path(path),
        bval=Path(bval),
        bvec=Path(bvec),
        metadata=metadata,
        entities=entities,
        mask=mask,
        field_strength=strength,
        role=role,
    )


def _field_strength(metadata: Mapping[str, Any], stem: str) -> float | None:
    value = metadata.get("MagneticFieldStrength")
    if value is None:
        return None
    try:
        strength = float(value)
    except (TypeError, ValueError):
        strength = math.nan
    if not math.isfinite(strength) or strength <= 0 or isinstance(value, bool):
        raise BadDataError(f"{stem}: MagneticFieldStrength {value!r} in the JSON sidecar is not a positive "
                           "number of tesla (BIDS writes e.g. 3, not \"3T\"); correct the sidecar")
    return strength


def _role(path: str, strength: float | None, role_paths: Mapping[str, set], dwi_filtered: bool):
    for role in (SOURCE, TARGET):
        if path in role_paths.get(role, ()):
            return role
    if strength is not None:
        return SOURCE if strength < SOURCE_MAX_FIELD_STRENGTH else TARGET
    if dwi_filtered and not role_paths:
        return SOURCE  # the user's "dwi" filter selected these runs as the 3T ones
    return None


# --------------------------------------------------------------------------- masks
def find_brain_mask(layout, entities: Mapping[str, Any]) -> Path | None:
    """The ``desc-brain_mask`` matching a run of a derivatives dataset (e.g. qsiprep), or None.

    Looks for ``suffix=mask, desc=brain`` with the run's subject, session and ``space``;
    first with all of the run's other entities (absent ones must be absent), then, when that
    finds nothing, with subject/session/space only. A unique match is returned; none or
    several give None (logged), and the workflow then computes the mask.
    """
    from bids.layout import Query

    base = {"suffix": "mask", "desc": "brain", "extension": list(DWI_EXTENSIONS)}
    keep = ("subject", "session", "space")
    strict = dict(base)
    for name in list(DWI_ENTITY_KEYS) + ["space", "res", "den"]:
        strict[name] = entities.get(name, Query.NONE)
    loose = dict(base)
    for name in keep:
        loose[name] = entities.get(name, Query.NONE)
    for query in (strict, loose):
        found = layout.get(return_type="filename", invalid_filters="allow", **query)
        if len(found) == 1:
            return Path(found[0])
        if len(found) > 1:
            LOGGER.warning(
                "%s: %d brain masks match (%s); computing one instead",
                bids_stem(entities), len(found), ", ".join(Path(f).name for f in found),
            )
            return None
    return None

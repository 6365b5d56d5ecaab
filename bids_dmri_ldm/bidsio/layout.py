"""BIDS input: pybids queries -> :class:`DWIRun` records, 3T/7T roles and pairing.

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
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadDataError, MissingInputError, NoDataError, UsageError

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
    gradients = GradientIndex(layout)
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
    bval = _gradient_file(gradients, bids_file, "bval", stem)
    bvec = _gradient_file(gradients, bids_file, "bvec", stem)
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


class GradientIndex:
    """All ``*dwi.bval``/``*dwi.bvec`` files of a layout, resolved by the inheritance principle.

    A gradient file applies to a DWI image when it lies in the image's folder or a parent
    folder and every entity in its name is also in the image's name with the same label; the
    nearest folder wins, then the file with the most entities.

    Written here instead of calling pybids ``get_bval``/``get_bvec`` per run for two reasons:
    pybids ``get_nearest`` only compares the entities both files share, so it accepts a
    sibling ``sub-01_acq-b_dwi.bval`` for ``sub-01_dwi.nii.gz`` (a wrong table, silently);
    and it queries the whole index on every call (~0.1 s per file, minutes for large
    datasets). One query up front and a walk up the folders is exact and fast.
    """

    def __init__(self, layout):
        self._files: dict[tuple[Path, str], list[tuple[dict, str]]] = defaultdict(list)
        found = layout.get(return_type="object", suffix="dwi", extension=[".bval", ".bvec"])
        for bids_file in found:
            entities = {k: str(v) for k, v in bids_file.get_entities().items()
                        if k not in ("suffix", "extension")}
            kind = bids_file.path.rsplit(".", 1)[-1]
            self._files[(Path(bids_file.path).parent, kind)].append((entities, bids_file.path))
        for candidates in self._files.values():
            candidates.sort(key=lambda item: (-len(item[0]), item[1]))
        self.root = Path(layout.root)

    def find(self, dwi_path: str | Path, entities: Mapping[str, Any], kind: str) -> str | None:
        """The ``kind`` ("bval" or "bvec") file that applies to ``dwi_path``, or None."""
        own = {k: str(v) for k, v in entities.items()}
        folder = Path(dwi_path).parent
        while True:
            for theirs, path in self._files.get((folder, kind), ()):
                if all(own.get(k) == v for k, v in theirs.items()):
                    return path
            if folder == self.root or folder.parent == folder:
                return None
            folder = folder.parent


def _gradient_file(index: GradientIndex, bids_file, kind: str, stem: str) -> str:
    found = index.find(bids_file.path, bids_file.get_entities(), kind)
    if found is None:
        raise BadDataError(
            f"{stem}: no .{kind} file found (next to the image or inherited from a parent "
            f"folder, e.g. dwi.{kind} at the dataset root)"
        )
    return found


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


# --------------------------------------------------------------------------- roles, pairs
def is_source(run: DWIRun) -> bool:
    """Whether ``run`` is a source (3T-like, < 5 T) run."""
    return run.role == SOURCE


def is_target(run: DWIRun) -> bool:
    """Whether ``run`` is a target (7T-like, >= 5 T) run."""
    return run.role == TARGET


def split_by_field_strength(runs: Iterable[DWIRun]):
    """Split runs into ``(source, target, unknown)`` lists by their role.

    ``unknown`` holds runs whose field strength is missing and that no filter classified.
    """
    source, target, unknown = [], [], []
    for run in runs:
        {SOURCE: source, TARGET: target}.get(run.role, unknown).append(run)
    return source, target, unknown


def source_runs(runs: Sequence[DWIRun]) -> list[DWIRun]:
    """The runs the participant level processes.

    Raises
    ------
    BadDataError
        Some runs have no ``MagneticFieldStrength`` and no filter says what they are (65).
    NoDataError
        None of the selected runs is a source (< 5 T) run (18).
    """
    source, target, unknown = split_by_field_strength(runs)
    if unknown:
        raise BadDataError(
            f"MagneticFieldStrength is missing for {len(unknown)} run(s) (e.g. {unknown[0]}); "
            "add it to the JSON sidecars or pass --bids-filter-file selecting the 3T runs, "
            'e.g. {"dwi": {"acquisition": "3T"}}'
        )
    if not source:
        strengths = sorted({f"{r.field_strength:g} T" for r in target})
        raise NoDataError(
            f"no source (below {SOURCE_MAX_FIELD_STRENGTH:g} T) DWI run among the {len(runs)} "
            f"selected (found {', '.join(strengths) or 'none'})"
        )
    return source


def pair_runs(runs: Sequence[DWIRun]) -> list[tuple[DWIRun, DWIRun]]:
    """Pair source and target runs of the same participant, for the group level.

    Within a participant, runs are matched on session when both field strengths exist in the
    same session, else on everything but session and ``acq`` (so ``ses-3T``/``ses-7T`` or
    ``acq-3T``/``acq-7T`` layouts pair up); any remaining source runs pair with the
    participant's first target run. Every source run appears at most once.

    Returns
    -------
    list of (source_run, target_run)
        Sorted by participant.

    Raises
    ------
    NoDataError
        No participant has both a source and a target run (18); the message says what was
        found.
    """
    by_subject: dict[str, dict[str, list[DWIRun]]] = defaultdict(lambda: {SOURCE: [], TARGET: []})
    for run in runs:
        if run.role in (SOURCE, TARGET):
            by_subject[run.subject][run.role].append(run)
    pairs = []
    for subject in sorted(by_subject):
        group = by_subject[subject]
        if group[SOURCE] and group[TARGET]:
            pairs.extend(_pair_within_subject(group[SOURCE], group[TARGET]))
    if not pairs:
        n_source = sum(len(g[SOURCE]) for g in by_subject.values())
        n_target = sum(len(g[TARGET]) for g in by_subject.values())
        unknown = sum(1 for r in runs if r.role not in (SOURCE, TARGET))
        raise NoDataError(
            "the group level needs participants with both 3T and 7T DWI runs, but found "
            f"{n_source} source (< {SOURCE_MAX_FIELD_STRENGTH:g} T) run(s) in participants "
            f"{_subjects(by_subject, SOURCE)} and {n_target} target run(s) in participants "
            f"{_subjects(by_subject, TARGET)}"
            + (f", and {unknown} run(s) without MagneticFieldStrength (see --bids-filter-file)"
               if unknown else "")
        )
    return pairs


def _subjects(by_subject, role) -> str:
    labels = [s for s, g in sorted(by_subject.items()) if g[role]]
    return "[" + ", ".join(labels) + "]"


def _pair_key(run: DWIRun, with_session: bool) -> tuple:
    ignore = {"acquisition"} | (set() if with_session else {"session"})
    return tuple(
        (name, str(run.entities.get(name)))
        for name in DWI_ENTITY_KEYS
        if name not in ignore and name != "subject"
    )


def _pair_within_subject(sources: list[DWIRun], targets: list[DWIRun]):
    pairs = []
    remaining = list(sources)
    for with_session in (True, False):
        by_key = {}
        for target in targets:
            by_key.setdefault(_pair_key(target, with_session), target)
        still = []
        for source in remaining:
            match = by_key.get(_pair_key(source, with_session))
            if match is not None:
                pairs.append((source, match))
            else:
                still.append(source)
        remaining = still
    pairs.extend((source, targets[0]) for source in remaining)
    return sorted(pairs, key=lambda p: str(p[0].dwi))

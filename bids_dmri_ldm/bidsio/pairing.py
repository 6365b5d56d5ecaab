"""3T/7T roles of the collected runs and their pairing, for the participant and group levels.

A run's role (:data:`~.layout.SOURCE` below :data:`~.layout.SOURCE_MAX_FIELD_STRENGTH` tesla,
:data:`~.layout.TARGET` at or above it) is decided when the runs are collected
(:func:`~.layout.collect_dwi_runs`); here: the participant level's source runs
(:func:`source_runs`) and the group level's source/target pairs (:func:`pair_runs`).
Exit codes: runs of unknown role are *bad data* (65); no source run, or no participant with
both, is *no data* (18).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from ..errors import BadDataError, NoDataError
from .layout import DWI_ENTITY_KEYS, SOURCE, SOURCE_MAX_FIELD_STRENGTH, TARGET, DWIRun


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

"""Group level: the RISH features of every run, computed by the participant steps themselves.

:func:`compute_run_rish` runs ``select_shells_step`` -> ``load_dwi_step`` -> ``brain_mask_step``
-> ``fit_rish_step`` on one run, so source and target features are what the participant level
would compute; :func:`cached_run_rish` caches them in the work dir
(``<work_dir>/ldm_rish_cache/<key>.npz``, the key hashing the input files' paths, sizes and
modification times and the shell settings). Also the shells a group can train
(:func:`common_shells`, :func:`training_shell`) and the runs whose features train a model
(:func:`feature_runs`, :func:`collect_ldm_features`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from ..errors import (
    BadDataError,
    NoDataError,
    UsageError,
)
from ..interfaces import steps
from ..io.files import atomic_path
from ..methods import Method

if TYPE_CHECKING:  # pragma: no cover
    from ..bidsio.layout import DWIRun
    from ..config import RunConfig

LOGGER = logging.getLogger("bids_dmri_ldm.group")


def compute_run_rish(run: DWIRun, shells: Sequence[float], tolerance: float, sh_order_max: int,
                     scratch: str | Path) -> tuple[dict[float, np.ndarray], np.ndarray, np.ndarray]:
    """RISH maps ``{shell: (X, Y, Z, 3)}`` of the given shells, brain mask ``(X, Y, Z)`` and affine
    of one run, on its own grid.

    Uses the participant-level steps (:mod:`bids_dmri_ldm.interfaces.steps`), so source and
    target runs go through exactly the processing the translation assumes (the same brain mask,
    one SH fit per shell). The keys are the values of ``shells`` (s/mm²).

    Raises
    ------
    InputDataError
        The run lacks one of the shells, or has too few directions in it.
    """
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    options = steps.ShellOptions(tolerance=float(tolerance), sh_order_max=int(sh_order_max),
                                 shells=tuple(float(b) for b in shells), only_selected=True)
    sel = steps.select_shells_step(str(run.dwi), str(run.bval), str(run.bvec), options.to_dict(), scratch)
    loaded = steps.load_dwi_step(str(run.dwi), sel["plan_file"], scratch)
    mask = steps.brain_mask_step(loaded["mean_b0_file"], loaded["bad_voxels_file"], scratch,
                                 str(run.mask) if getattr(run, "mask", None) else None, loaded["mean_dwi_file"])
    fitted = steps.fit_rish_step(loaded["dwi_file"], sel["plan_file"], sh_order_max, scratch)
    plan, _ = steps.read_plan(sel["plan_file"])
    found = [p.bval for p in plan.fitted]
    rish, affine = {}, None
    for shell in shells:
        k = int(np.argmin([abs(b - float(shell)) for b in found]))
        img = nib.load(fitted["rish_files"][k])
        rish[float(shell)], affine = np.asanyarray(img.dataobj, dtype=np.float32), img.affine
    brain = np.asanyarray(nib.load(mask["mask_file"]).dataobj) > 0
    return rish, brain, affine


def common_shells(runs: Sequence[DWIRun], tolerance: float, sh_order_max: int) -> list[float]:
    """The shells (s/mm², rounded, ascending) every one of ``runs`` has within ``tolerance``
    (of the first run's shells) with enough directions for the SH order; the default set
    rish-global is fitted for.

    Raises
    ------
    BadDataError
        A run's gradient table cannot be read, or the runs share no shell.
    """
    from ..core.gradients import GradientError, load_gradients
    from ..core.sh import DIRECTIONS_FOR_ORDER
    from ..core.shells import (
        cluster_shells,
        find_shell,
        shells_text,
    )

    needed = DIRECTIONS_FOR_ORDER.get(int(sh_order_max), 0)
    tables = []
    for run in runs:
        try:
            tables.append(cluster_shells(load_gradients(run.bval, run.bvec)[0], tolerance))
        except (GradientError, TypeError) as err:
            raise BadDataError(f"{getattr(run, 'stem', run.dwi)}: {err}") from None
    if not tables:
        return []

    def fits(table, bval) -> bool:
        k = find_shell(table, bval, tolerance)
        return k is not None and table[k].n_volumes >= needed

    shared = [float(round(s.bval)) for s in tables[0] if all(fits(t, s.bval) for t in tables)]
    if not shared:
        found = "; ".join(f"{getattr(r, 'stem', r.dwi)}: {shells_text(t)}" for r, t in zip(runs, tables))
        raise BadDataError(f"the 3T and 7T runs share no shell within {tolerance:g} s/mm² with the {needed} "
                           f"directions SH order {sh_order_max} needs ({found})")
    return shared


def training_shell(config: RunConfig, method: Method) -> float:
    """The one shell an ldm/cnn bundle is trained for (``--shell``, default 1000 s/mm²).

    Raises
    ------
    UsageError
        Several ``--shell`` values: a bundle holds one shell; train one bundle per shell, each
        into its own output folder, and use each at the participant level with ``--shell``.
    """
    if config.shells and len(config.shells) > 1:
        shown = " ".join(f"{b:g}" for b in config.shells)
        raise UsageError(f"--method {method.value} trains one shell per bundle, got --shell {shown}; train one "
                         "bundle per shell (one --shell each, into separate output folders)")
    return config.training_shell



RISH_CACHE_DIR = "ldm_rish_cache"
"""Folder of the work dir holding the cached RISH features (one ``.npz`` per run)."""


def _file_fingerprint(path: str | os.PathLike | None) -> list:
    if path is None:
        return [None]
    stat = os.stat(path)
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def rish_cache_key(run: DWIRun, shells: Sequence[float], tolerance: float, sh_order_max: int) -> str:
    """Cache key of a run's RISH features: SHA-256 of the input files' (path, size, mtime)
    and the settings that change the features."""
    parts = [_file_fingerprint(run.dwi), _file_fingerprint(run.bval), _file_fingerprint(run.bvec),
             _file_fingerprint(getattr(run, "mask", None)), [float(b) for b in shells], float(tolerance),
             int(sh_order_max), "v2"]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def cached_run_rish(run: DWIRun, config: RunConfig, shells: Sequence[float], stats: dict[str, int] | None = None
                    ) -> tuple[dict[float, np.ndarray], np.ndarray, np.ndarray]:
    """:func:`compute_run_rish` through the work-dir cache (``{shell: RISH}``, mask, affine).

    ``stats`` (optional) counts ``"computed"`` and ``"reused"`` runs.
    """
    shells = [float(b) for b in shells]
    cache_dir = Path(config.work_dir) / RISH_CACHE_DIR
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = rish_cache_key(run, shells, config.shell_tolerance, config.sh_order_max)
    cache_file = cache_dir / f"{key}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file) as data:
                out = ({b: data[f"rish_{k}"].astype(np.float32) for k, b in enumerate(shells)},
                       data["mask"].astype(bool), data["affine"])
            if stats is not None:
                stats["reused"] = stats.get("reused", 0) + 1
            LOGGER.info("group: RISH of %s reused from the cache", run.stem)
            return out
        except (OSError, KeyError, ValueError):  # truncated or foreign file: recompute
            LOGGER.warning("group: unreadable RISH cache %s, recomputing", cache_file)
    scratch = Path(tempfile.mkdtemp(prefix="rish_", dir=cache_dir))
    try:
        LOGGER.info("group: RISH of %s", run.stem)
        rish, mask, affine = compute_run_rish(run, shells, config.shell_tolerance, config.sh_order_max, scratch)
    except steps.InputDataError as err:
        raise BadDataError(f"{run.stem}: {err}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    with atomic_path(cache_file, suffix=".npz") as tmp:
        np.savez(tmp, mask=mask, affine=np.asarray(affine, np.float64),
                 **{f"rish_{k}": rish[b].astype(np.float32) for k, b in enumerate(shells)})
    if stats is not None:
        stats["computed"] = stats.get("computed", 0) + 1
    return rish, mask, affine


def shell_rish(run: DWIRun, config: RunConfig, shell: float, stats: dict[str, int] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RISH maps ``(X, Y, Z, 3)`` of one shell, brain mask and affine of a run (cached)."""
    rish, mask, affine = cached_run_rish(run, config, [shell], stats)
    return rish[float(shell)], mask, affine


def feature_runs(runs: Sequence[DWIRun]) -> dict[str, dict[str, DWIRun]]:
    """``{"source": {participant: run}, "target": {participant: run}}``: the one 3T and one 7T run
    of each participant that training uses (see :func:`collect_ldm_features`)."""
    from ..bidsio.layout import SOURCE, TARGET
    from ..bidsio.pairing import pair_runs

    chosen: dict[str, dict[str, Any]] = {SOURCE: {}, TARGET: {}}
    try:
        for source, target in pair_runs(runs):
            chosen[SOURCE].setdefault(source.subject, source)
            chosen[TARGET].setdefault(target.subject, target)
    except NoDataError:
        pass  # the trainers name what was found
    for run in runs:
        if getattr(run, "role", None) in (SOURCE, TARGET):
            chosen[run.role].setdefault(run.subject, run)
    return chosen


def collect_ldm_features(config: RunConfig, runs: Sequence[DWIRun], stats: dict[str, int] | None = None
                         ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                                    dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """RISH features ``{participant: (RISH (X, Y, Z, 3), mask (X, Y, Z), affine (4, 4))}`` of the
    3T and 7T runs, of the training shell (:func:`training_shell`), each on its own grid
    (training pairs them through the affines).

    One source (3T) and one target (7T) run per participant: the run of its first 3T/7T pair
    (:func:`~bids_dmri_ldm.bidsio.pairing.pair_runs`) when it has one, else its first run of that
    field strength (3T-only participants train the 3T VQ-VAE and the LDM's 3T class).
    """
    from ..bidsio.layout import SOURCE, TARGET

    chosen = feature_runs(runs)
    shell = config.training_shell
    features = {}
    for role in (SOURCE, TARGET):
        features[role] = {}
        for subject in sorted(chosen[role]):
            features[role][subject] = shell_rish(chosen[role][subject], config, shell, stats)
    return features[SOURCE], features[TARGET]

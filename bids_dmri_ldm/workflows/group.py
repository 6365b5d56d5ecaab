"""Group level: learn a translation model from paired 3T (source) / 7T (target) participants.

:func:`run_group` dispatches on ``--method`` through :data:`GROUP_TRAINERS`; each trainer takes
the run configuration and every selected run, and returns an exit status. The trained model is
written to ``<output_dir>/models/<method>/`` (listed in ``.bidsignore``); use it at the
participant level with ``--model-dir <output_dir>/models``.

``rish-global``: the RISH maps of both runs of every pair are computed with the same steps as
the participant level (shell selection, mask, S/S0, least-squares SH, Eq. 1), the source maps
are resampled onto the target grid through the two affines (same head, same scanner space), and
the factor of each order is the median of the voxel-wise lambda_l (Eq. 2) over the brain voxels
of all pairs (:func:`bids_dmri_ldm.methods.fit_rish_global`).
``ldm``: the RISH maps of every participant's 3T run (paired or not) and 7T run are computed
once with the same steps and cached in the work dir (``<work_dir>/ldm_rish_cache/<key>.npz``,
the key hashing the input files' paths, sizes and modification times and the shell settings),
so later stages and reruns reuse them; then :func:`bids_dmri_ldm.ml.training.train_all` trains
the four stages (``--stage``, ``--resume``) with the ``--config`` training config (built-in
``demo``/``paper`` or a JSON/YAML file) and the bundle is written to ``<output_dir>/models/ldm/``,
the loss curves to ``<output_dir>/training/``, and ``<output_dir>/group_training.html``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from ..bids import derivatives as deriv
from ..cli.exitcodes import (
    EX_FAILURE,
    EX_OK,
    BadDataError,
    BidsAppError,
    NoDataError,
    OutputError,
    UsageError,
)
from ..interfaces import steps
from ..methods import Method, RishPair, fit_rish_global, save_rish_global_model

if TYPE_CHECKING:  # pragma: no cover
    from ..bids.layout import DWIRun
    from ..config import RunConfig

LOGGER = logging.getLogger("bids_dmri_ldm.group")


def group_model_dir(config: RunConfig, method: Method) -> Path:
    """Where the group level writes the model of ``method``."""
    return Path(config.output_dir) / "models" / method.value


def compute_run_rish(run: DWIRun, shell: float, tolerance: float, sh_order_max: int,
                     scratch: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RISH maps ``(X, Y, Z, 3)``, brain mask ``(X, Y, Z)`` and affine of one run, on its own grid.

    Uses the participant-level steps (:mod:`bids_dmri_ldm.interfaces.steps`), so source and
    target runs go through exactly the processing the translation assumes.
    """
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    sel = steps.select_shell_step(str(run.dwi), str(run.bval), str(run.bvec), shell, tolerance, sh_order_max, scratch)
    loaded = steps.load_dwi_step(str(run.dwi), sel["index"], sel["n_b0"], scratch)
    mask = steps.brain_mask_step(loaded["mean_b0_file"], loaded["bad_voxels_file"], scratch,
                                 str(run.mask) if getattr(run, "mask", None) else None)
    fitted = steps.fit_rish_step(loaded["dwi_file"], sel["bval_file"], sel["bvec_file"], mask["mask_file"],
                                 sh_order_max, scratch)
    rish_img = nib.load(fitted["rish_file"])
    rish = np.asanyarray(rish_img.dataobj, dtype=np.float32)
    brain = np.asanyarray(nib.load(mask["mask_file"]).dataobj) > 0
    return rish, brain, rish_img.affine


def train_rish_global(config: RunConfig, runs: Sequence[DWIRun]) -> int:
    """Fit and save the rish-global model from every 3T/7T pair among ``runs``."""
    from ..bids.layout import pair_runs

    pairs = pair_runs(runs)
    try:
        deriv.init_derivatives_dataset(config.output_dir, config.bids_dir)
    except deriv.OutputWriteError as err:
        raise OutputError(str(err)) from None
    Path(config.work_dir).mkdir(parents=True, exist_ok=True)
    scratch_root = Path(tempfile.mkdtemp(prefix="rish_global_", dir=config.work_dir))
    rish_pairs, described = [], []
    try:
        for index, (source, target) in enumerate(pairs):
            label = f"{source.stem} -> {target.stem}"
            LOGGER.info("group: RISH of pair %s", label)
            try:
                src = compute_run_rish(source, config.shell, config.shell_tolerance, config.sh_order_max,
                                       scratch_root / f"{index}_source")
                tgt = compute_run_rish(target, config.shell, config.shell_tolerance, config.sh_order_max,
                                       scratch_root / f"{index}_target")
            except steps.InputDataError as err:
                raise BadDataError(f"pair {label}: {err}") from None
            rish_pairs.append(RishPair(*src, *tgt, label=label))
            described.append({"source": _uri(source, config), "target": _uri(target, config),
                              "source_field_strength": getattr(source, "field_strength", None),
                              "target_field_strength": getattr(target, "field_strength", None)})
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)
    model = fit_rish_global(
        rish_pairs, shell=config.shell, sh_order_max=config.sh_order_max,
        extra_training={"runs": described, "dataset": Path(config.bids_dir).resolve().as_uri(),
                        "participants": sorted({p[0].subject for p in pairs}),
                        "software": deriv.software_versions(),
                        "settings": {"shell": config.shell, "shell_tolerance": config.shell_tolerance,
                                     "sh_order_max": config.sh_order_max}},
    )
    model_file = save_rish_global_model(model, group_model_dir(config, Method.RISH_GLOBAL))
    factors = ", ".join(f"L{o}={f:.4f}" for o, f in zip(model.orders, model.factors))
    LOGGER.info("group: rish-global model from %d pair(s), %d voxels: %s -> %s",
                len(rish_pairs), model.training["n_voxels"], factors, model_file)
    return EX_OK


def _uri(run, config) -> str:
    try:
        return deriv.bids_uri(run.dwi, config.bids_dir)
    except ValueError:
        return str(run.dwi)


def _no_training(method: Method) -> Callable[..., int]:
    def trainer(config, runs) -> int:
        raise UsageError(f"--method {method.value} has nothing to learn at the group level; "
                         "use --method rish-global or --method ldm")
    return trainer


# ---------------------------------------------------------------------------------------------
# ldm

RISH_CACHE_DIR = "ldm_rish_cache"
"""Folder of the work dir holding the cached RISH features (one ``.npz`` per run)."""

DEFAULT_TRAIN_CONFIG = "demo"
"""Training config used when ``--config`` is not given."""


def _file_fingerprint(path: str | os.PathLike | None) -> list:
    if path is None:
        return [None]
    stat = os.stat(path)
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def rish_cache_key(run: DWIRun, shell: float, tolerance: float, sh_order_max: int) -> str:
    """Cache key of a run's RISH features: SHA-256 of the input files' (path, size, mtime)
    and the settings that change the features."""
    parts = [_file_fingerprint(run.dwi), _file_fingerprint(run.bval), _file_fingerprint(run.bvec),
             _file_fingerprint(getattr(run, "mask", None)), float(shell), float(tolerance), int(sh_order_max),
             "v1"]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def cached_run_rish(run: DWIRun, config: RunConfig, stats: dict[str, int] | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`compute_run_rish` through the work-dir cache (RISH, mask, affine).

    ``stats`` (optional) counts ``"computed"`` and ``"reused"`` runs.
    """
    cache_dir = Path(config.work_dir) / RISH_CACHE_DIR
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = rish_cache_key(run, config.shell, config.shell_tolerance, config.sh_order_max)
    cache_file = cache_dir / f"{key}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file) as data:
                out = (data["rish"].astype(np.float32), data["mask"].astype(bool), data["affine"])
            if stats is not None:
                stats["reused"] = stats.get("reused", 0) + 1
            LOGGER.info("group: RISH of %s reused from the cache", run.stem)
            return out
        except (OSError, KeyError, ValueError):  # truncated or foreign file: recompute
            LOGGER.warning("group: unreadable RISH cache %s, recomputing", cache_file)
    scratch = Path(tempfile.mkdtemp(prefix="rish_", dir=cache_dir))
    try:
        LOGGER.info("group: RISH of %s", run.stem)
        rish, mask, affine = compute_run_rish(run, config.shell, config.shell_tolerance, config.sh_order_max, scratch)
    except steps.InputDataError as err:
        raise BadDataError(f"{run.stem}: {err}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tmp = cache_dir / f".{key}.tmp.npz"
    np.savez(tmp, rish=rish.astype(np.float32), mask=mask, affine=np.asarray(affine, np.float64))
    os.replace(tmp, cache_file)
    if stats is not None:
        stats["computed"] = stats.get("computed", 0) + 1
    return rish, mask, affine


def collect_ldm_features(config: RunConfig, runs: Sequence[DWIRun], stats: dict[str, int] | None = None
                         ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """RISH features ``{participant: (RISH (X, Y, Z, 3), mask (X, Y, Z))}`` of the 3T and 7T runs.

    One source (3T) and one target (7T) run per participant: the run of its first 3T/7T pair
    (:func:`~bids_dmri_ldm.bids.layout.pair_runs`) when it has one, else its first run of that
    field strength (3T-only participants train the 3T VQ-VAE and the LDM's 3T class).
    """
    from ..bids.layout import SOURCE, TARGET, pair_runs

    chosen: dict[str, dict[str, Any]] = {SOURCE: {}, TARGET: {}}
    try:
        for source, target in pair_runs(runs):
            chosen[SOURCE].setdefault(source.subject, source)
            chosen[TARGET].setdefault(target.subject, target)
    except NoDataError:
        pass  # train_all names what was found
    for run in runs:
        if getattr(run, "role", None) in (SOURCE, TARGET):
            chosen[run.role].setdefault(run.subject, run)
    features = {}
    for role in (SOURCE, TARGET):
        features[role] = {}
        for subject in sorted(chosen[role]):
            rish, mask, _ = cached_run_rish(chosen[role][subject], config, stats)
            features[role][subject] = (rish, mask)
    return features[SOURCE], features[TARGET]


def _ldm_stages(stage: str) -> tuple[str, ...]:
    from ..ml.training import STAGES

    return tuple(STAGES) if stage in (None, "all") else (stage,)


def _load_train_config(config: RunConfig) -> dict[str, Any]:
    from ..ml.modelconfig import ConfigError, load_config

    name = config.train_config if config.train_config is not None else DEFAULT_TRAIN_CONFIG
    try:
        return load_config(name)
    except ConfigError as err:
        raise UsageError(f"--config: {err}") from None


def train_ldm(config: RunConfig, runs: Sequence[DWIRun]) -> int:
    """Group-level training of the latent diffusion model (all or one ``--stage``).

    Writes ``<output_dir>/models/ldm/`` (bundle), ``<output_dir>/training/`` (loss CSV + PNG)
    and ``<output_dir>/group_training.html``.
    """
    import torch

    from ..ml.device import resolve_device
    from ..ml.modelconfig import trained_for
    from ..ml.training import TrainingDataError, train_all

    train_cfg = _load_train_config(config)
    try:
        deriv.init_derivatives_dataset(config.output_dir, config.bids_dir)
    except deriv.OutputWriteError as err:
        raise OutputError(str(err)) from None
    stats: dict[str, int] = {}
    rish_3t, rish_7t = collect_ldm_features(config, runs, stats)
    LOGGER.info("group: RISH features of %d 3T and %d 7T participant(s) (%d computed, %d from the cache)",
                len(rish_3t), len(rish_7t), stats.get("computed", 0), stats.get("reused", 0))
    if config.seed:
        train_cfg["training"]["seed"] = int(config.seed)
    # what the bundle is trained for; the participant level refuses other data (config.json)
    train_cfg["trained_for"] = trained_for(config.shell, config.sh_order_max, train_cfg["orders"])
    device = resolve_device(config.device)
    work = Path(config.work_dir) / "ldm_training" / train_cfg["name"]
    staging = Path(config.work_dir) / "ldm_training" / "out"
    command = " ".join(["bids-dmri-ldm", *sys.argv[1:]]) if sys.argv else ""
    try:
        bundle_dir = train_all(rish_3t, rish_7t, train_cfg, staging, work, device=device,
                               resume=bool(config.resume), stages=_ldm_stages(config.stage), command=command)
    except TrainingDataError as err:
        raise NoDataError(f"ldm training: {err}") from None
    except torch.OutOfMemoryError:
        raise BidsAppError(f"out of GPU memory while training on {device} (model grid {train_cfg['grid']}, "
                           f"batch size {train_cfg['training']['batch_size']}): use a config with a smaller "
                           "grid or batch size, or --device cpu", EX_FAILURE) from None
    _publish_training_outputs(config, staging, bundle_dir)
    if bundle_dir is not None:
        _write_examples(config, train_cfg, rish_3t, rish_7t, device)
    _write_training_report(config)
    if bundle_dir is None:
        LOGGER.info("group: stage(s) %s done; run the remaining stages (--stage) to write the bundle",
                    ", ".join(_ldm_stages(config.stage)))
    else:
        LOGGER.info("group: ldm model bundle -> %s (use it with --model-dir %s)",
                    group_model_dir(config, Method.LDM), Path(config.output_dir) / "models")
    return EX_OK


def _write_examples(config: RunConfig, train_cfg: dict[str, Any], rish_3t, rish_7t, device,
                    n_examples: int = 2) -> None:
    """Translate up to ``n_examples`` validation participants with the new bundle and save
    ``training/sub-<label>_example.npz`` (source 3T, predicted 7T-like, real 7T RISH, each cropped
    to its brain and resized to the model grid so they sit side by side) for the training report.
    A failure is logged, never fatal."""
    try:
        import numpy as np

        from ..ml.bundle import load_bundle
        from ..ml.data import to_model_grid
        from ..ml.inference import translate_rish
        from ..ml.training import split_participants

        bundle = load_bundle(group_model_dir(config, Method.LDM), device=device)
        grid = tuple(bundle.config["grid"])
        margin = int(bundle.config["translation"].get("crop_margin", 2))
        paired = sorted(set(rish_3t) & set(rish_7t))
        train, val = split_participants(paired, float(train_cfg["training"]["val_fraction"]),
                                        int(train_cfg["training"]["seed"]))
        out = Path(config.output_dir) / "training"
        out.mkdir(parents=True, exist_ok=True)

        def on_grid(rish, mask):
            volumes, mask_model, _ = to_model_grid(rish, mask, grid, margin)
            return np.moveaxis(volumes[:, 0].numpy(), 0, -1), mask_model.numpy()

        for label in (val or train)[:n_examples]:
            (r3, m3), (r7, m7) = rish_3t[label], rish_7t[label]
            prediction = translate_rish(r3, m3, bundle, device=device, seed=config.seed).pred_7t
            source, mask = on_grid(r3, m3)
            arrays = {"source": source, "prediction": on_grid(prediction, m3)[0],
                      "target": on_grid(r7, m7)[0], "mask": mask}
            tmp = out / f".sub-{label}_example.tmp.npz"
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, out / f"sub-{label}_example.npz")
    except Exception as err:  # noqa: BLE001 - examples are for the report only
        LOGGER.warning("group: example reconstructions not written: %s", err)


def _publish_training_outputs(config: RunConfig, staging: Path, bundle_dir: Path | None) -> None:
    """Move the bundle to ``models/ldm/`` and copy the loss curves to ``training/`` (atomically)."""
    out = Path(config.output_dir)
    try:
        logs = staging / "training"
        if logs.is_dir():
            (out / "training").mkdir(parents=True, exist_ok=True)
            for file in logs.iterdir():
                deriv.atomic_copy(file, out / "training" / file.name)
        if bundle_dir is not None:
            target = group_model_dir(config, Method.LDM)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.new")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(bundle_dir, tmp)
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise OutputError(f"cannot write the trained model to {out}: {err}") from None


def _write_training_report(config: RunConfig) -> None:
    """``group_training.html``; a failure here is logged, never fatal."""
    try:
        from ..reports.training import build_training_report

        bundle_cfg = group_model_dir(config, Method.LDM) / "config.json"
        cfg = json.loads(bundle_cfg.read_text()) if bundle_cfg.is_file() else None
        path = build_training_report(config.output_dir, config=cfg, logger=LOGGER)
        LOGGER.info("group: training report %s", path)
    except Exception as err:  # noqa: BLE001 - the report must never fail the training
        LOGGER.warning("group: training report not written: %s", err)


GROUP_TRAINERS: dict[Method, Callable[[Any, Sequence[Any]], int]] = {
    Method.IDENTITY: _no_training(Method.IDENTITY),
    Method.RISH_GLOBAL: train_rish_global,
    Method.LDM: train_ldm,
}
"""Method -> group-level trainer ``(config, runs) -> exit status``."""


def run_group(config: RunConfig, runs: Sequence[DWIRun]) -> int:
    """Group level entry point called by the command line; returns the exit status."""
    return GROUP_TRAINERS[Method(config.method)](config, runs)

"""Group level: learn a translation model from paired 3T (source) / 7T (target) participants.

:func:`run_group` dispatches on ``--method`` through :data:`GROUP_TRAINERS`; each trainer takes
the run configuration and every selected run, and returns an exit status. The trained model is
written to ``<output_dir>/models/<method>/`` (listed in ``.bidsignore``); use it at the
participant level with ``--model-dir <output_dir>/models``.

``rish-global``: for each shell (``--shell``; default: every shell the training pairs' 3T and
7T runs share, :func:`common_shells`), the RISH maps of both runs of every pair are computed with
the same steps as the participant level (shell clustering, mask, S/S0, least-squares SH per
shell, Eq. 1), the source maps are resampled onto the target grid through the two affines (same
head, same scanner space), and the factor of each order is the median of the voxel-wise
lambda_l (Eq. 2) over the brain voxels of all pairs
(:func:`bids_dmri_ldm.ml.rish_global.fit_rish_global_shells`): one model file holds the factors of
every shell, its ``trained_for`` lists them; the validation gate scores the lowest shell.
``ldm`` and ``cnn`` train one shell per bundle (``--shell B``, default 1000 s/mm²; several values
are refused, 64: train one bundle per shell into separate output folders). The RISH maps of
every participant's 3T run (paired or not) and 7T run are computed
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

from ..bidsio import derivatives as deriv
from ..errors import (
    EX_FAILURE,
    EX_OK,
    BadDataError,
    BidsAppError,
    NoDataError,
    OutputError,
    UsageError,
)
from ..interfaces import steps
from ..io.files import atomic_path, replace_dir
from ..methods import Method, save_rish_global_model
from ..ml.rish_global import RishPair, fit_rish_global, fit_rish_global_shells
from ..vocabulary import ALL_STAGES, LDM_STAGES

if TYPE_CHECKING:  # pragma: no cover
    from ..bidsio.layout import DWIRun
    from ..config import RunConfig

LOGGER = logging.getLogger("bids_dmri_ldm.group")


def group_model_dir(config: RunConfig, method: Method) -> Path:
    """Where the group level writes the model of ``method``."""
    return Path(config.output_dir) / "models" / method.value


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


RISH_GLOBAL_VAL_FRACTION = 0.2
"""Share of the paired participants held out from the rish-global fit for its validation gate."""


def train_rish_global(config: RunConfig, runs: Sequence[DWIRun]) -> int:
    """Fit the rish-global model on the training participants' 3T/7T pairs, validate it on the
    held-out ones (:func:`run_gate`) and save it with its validation table."""
    from ..bidsio.pairing import pair_runs
    from ..methods import RishGlobalMethod
    from ..ml.split import split_participants

    pairs = pair_runs(runs)
    try:
        deriv.init_derivatives_dataset(config.output_dir, config.bids_dir)
    except deriv.OutputWriteError as err:
        raise OutputError(str(err)) from None
    Path(config.work_dir).mkdir(parents=True, exist_ok=True)
    train_ids, val_ids = split_participants(sorted({s.subject for s, _ in pairs}), RISH_GLOBAL_VAL_FRACTION,
                                            int(config.seed))
    train_pairs = [(source, target) for source, target in pairs if source.subject in train_ids]
    shells = list(config.shells) if config.shells else common_shells(
        [run for pair in train_pairs for run in pair], config.shell_tolerance, config.sh_order_max)
    LOGGER.info("group: rish-global factors for the shell(s) b=%s s/mm²", "/".join(f"{b:g}" for b in shells))
    pairs_by_shell: dict[float, list[RishPair]] = {float(b): [] for b in shells}
    described = []
    for source, target in train_pairs:
        label = f"{source.stem} -> {target.stem}"
        LOGGER.info("group: RISH of pair %s", label)
        rish_s, mask_s, affine_s = cached_run_rish(source, config, shells)
        rish_t, mask_t, affine_t = cached_run_rish(target, config, shells)
        for b in pairs_by_shell:
            pairs_by_shell[b].append(RishPair(rish_s[b], mask_s, affine_s, rish_t[b], mask_t, affine_t, label=label))
        described.append({"source": _uri(source, config), "target": _uri(target, config),
                          "source_field_strength": getattr(source, "field_strength", None),
                          "target_field_strength": getattr(target, "field_strength", None)})
    model = fit_rish_global_shells(
        pairs_by_shell, sh_order_max=config.sh_order_max,
        extra_training={"runs": described, "dataset": deriv.source_dataset(config.bids_dir),
                        "participants": train_ids, "validation_participants": val_ids,
                        "software": deriv.software_versions(),
                        "settings": {"shells": [float(b) for b in shells], "shell_tolerance": config.shell_tolerance,
                                     "sh_order_max": config.sh_order_max}},
    )
    # the gate scores the lowest shell (the paper's metrics are of one shell)
    model.validation = run_gate(config, Method.RISH_GLOBAL.value, RishGlobalMethod(model), runs, train_ids, val_ids,
                                shell=float(shells[0]))
    model_file = save_rish_global_model(model, group_model_dir(config, Method.RISH_GLOBAL))
    for b, factors in model.shell_factors.items():
        LOGGER.info("group: rish-global b=%g from %d pair(s): %s", b, len(train_pairs),
                    ", ".join(f"L{o}={f:.4f}" for o, f in zip(model.orders, factors)))
    LOGGER.info("group: rish-global model -> %s", model_file)
    _write_training_report(config, Method.RISH_GLOBAL)
    return EX_OK


def _uri(run, config) -> str:
    try:
        return deriv.bids_uri(run.dwi, config.bids_dir)
    except ValueError:
        return str(run.dwi)


def _no_training(method: Method) -> Callable[..., int]:
    def trainer(config, runs) -> int:
        raise UsageError(f"--method {method.value} has nothing to learn at the group level; "
                         "use --method rish-global, ldm or cnn")
    return trainer


# ---------------------------------------------------------------------------------------------
# ldm

RISH_CACHE_DIR = "ldm_rish_cache"
"""Folder of the work dir holding the cached RISH features (one ``.npz`` per run)."""

DEFAULT_TRAIN_CONFIGS = {Method.LDM: "demo", Method.CNN: "cnn-demo"}
"""Training config of each learned method when ``--config`` is not given."""


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


def _ldm_stages(stage: str) -> tuple[str, ...]:
    return LDM_STAGES if stage in (None, ALL_STAGES) else (stage,)


def _load_train_config(config: RunConfig, method: Method = Method.LDM) -> dict[str, Any]:
    """The ``--config`` training config (default: the method's built-in one), which must describe
    ``method``."""
    from ..ml.modelconfig import ConfigError, config_method, load_config

    name = config.train_config if config.train_config is not None else DEFAULT_TRAIN_CONFIGS[method]
    try:
        cfg = load_config(name)
        described = config_method(cfg)
    except ConfigError as err:
        raise UsageError(f"--config: {err}") from None
    if described != method.value:
        raise UsageError(f"--config {name} is a {described} configuration; --method {method.value} needs a "
                         f"{method.value} one (e.g. --config {DEFAULT_TRAIN_CONFIGS[method]})")
    return cfg


def train_ldm(config: RunConfig, runs: Sequence[DWIRun]) -> int:
    """Group-level training of the latent diffusion model (all or one ``--stage``).

    Writes ``<output_dir>/models/ldm/`` (bundle), ``<output_dir>/training/`` (loss CSV + PNG)
    and ``<output_dir>/group_training.html``.
    """
    import torch

    from ..ml.device import resolve_device
    from ..ml.modelconfig import trained_for
    from ..ml.training import TrainingDataError, train_all
    from ..reports.training import plot_losses

    train_cfg = _load_train_config(config)
    shell = training_shell(config, Method.LDM)
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
    train_cfg["trained_for"] = trained_for(shell, config.sh_order_max, train_cfg["orders"])
    device = resolve_device(config.device)
    work = Path(config.work_dir) / "ldm_training" / train_cfg["name"]
    staging = Path(config.work_dir) / "ldm_training" / "out"
    command = " ".join(["bids-dmri-ldm", *sys.argv[1:]]) if sys.argv else ""
    try:
        bundle_dir = train_all(rish_3t, rish_7t, train_cfg, staging, work, device=device,
                               resume=bool(config.resume), stages=_ldm_stages(config.stage), command=command,
                               plot_losses=plot_losses)
    except TrainingDataError as err:
        raise NoDataError(f"ldm training: {err}") from None
    except torch.OutOfMemoryError:
        raise BidsAppError(f"out of GPU memory while training on {device} (model grid {train_cfg['grid']}, "
                           f"batch size {train_cfg['training']['batch_size']}): use a config with a smaller "
                           "grid or batch size, or --device cpu", EX_FAILURE) from None
    _gate_bundle(config, Method.LDM, bundle_dir, runs)
    _publish_training_outputs(config, staging, bundle_dir)
    if bundle_dir is not None:
        _write_examples(config, Method.LDM, train_cfg, rish_3t, rish_7t, device)
    _write_training_report(config)
    if bundle_dir is None:
        LOGGER.info("group: stage(s) %s done; run the remaining stages (--stage) to write the bundle",
                    ", ".join(_ldm_stages(config.stage)))
    else:
        LOGGER.info("group: ldm model bundle -> %s (use it with --model-dir %s)",
                    group_model_dir(config, Method.LDM), Path(config.output_dir) / "models")
    return EX_OK


def _write_examples(config: RunConfig, method: Method, train_cfg: dict[str, Any], rish_3t, rish_7t, device,
                    n_examples: int = 2) -> None:
    """Translate up to ``n_examples`` validation participants with the new ldm or cnn bundle and save
    ``training/sub-<label>_example.npz`` (source 3T, predicted 7T-like, real 7T RISH, in canonical
    orientation, the 7T brought into the 3T grid through the affines, all three cropped to the 3T
    brain box and resized to the model grid so they sit side by side, voxel for voxel) for the
    training report.  A failure is logged, never fatal."""
    try:
        import numpy as np

        from ..methods import load_method
        from ..ml.data import to_model_grid
        from ..ml.split import split_participants
        from ..ml.training_data import prepare_scans

        translator = load_method(method, group_model_dir(config, method), {"device": str(device), "seed": config.seed})
        grid = tuple(translator.bundle.config["grid"])
        margin = int(translator.bundle.config["translation"].get("crop_margin", 2))
        paired = sorted(set(rish_3t) & set(rish_7t))
        train, val = split_participants(paired, float(train_cfg["training"]["val_fraction"]),
                                        int(train_cfg["training"]["seed"]))
        out = Path(config.output_dir) / "training"
        out.mkdir(parents=True, exist_ok=True)

        def on_grid(rish, mask, box):
            volumes, mask_model, _ = to_model_grid(rish, mask, grid, margin, box_mask=box)
            return np.moveaxis(volumes[:, 0].numpy(), 0, -1), mask_model.numpy()

        labels = (val or train)[:n_examples]
        scans_3t, _, targets = prepare_scans({k: rish_3t[k] for k in labels}, {k: rish_7t[k] for k in labels})
        for label in labels:
            s3, t7 = scans_3t[label], targets[label]
            prediction = translator.translate(s3.rish, s3.mask).pred_7t
            source, mask = on_grid(s3.rish, s3.mask, s3.mask)
            arrays = {"source": source, "prediction": on_grid(prediction, s3.mask, s3.mask)[0],
                      "target": on_grid(t7.rish, t7.mask, s3.mask)[0], "mask": mask}
            with atomic_path(out / f"sub-{label}_example.npz", suffix=".npz") as tmp:
                np.savez_compressed(tmp, **arrays)
    except Exception as err:  # noqa: BLE001 - examples are for the report only
        LOGGER.warning("group: example reconstructions not written: %s", err)


def _publish_training_outputs(config: RunConfig, staging: Path, bundle_dir: Path | None,
                              method: Method = Method.LDM) -> None:
    """Move the bundle to ``models/<method>/`` and copy the loss curves to ``training/`` (atomically)."""
    out = Path(config.output_dir)
    try:
        logs = staging / "training"
        if logs.is_dir():
            (out / "training").mkdir(parents=True, exist_ok=True)
            for file in logs.iterdir():
                deriv.atomic_copy(file, out / "training" / file.name)
        if bundle_dir is not None:
            target = group_model_dir(config, method)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.new")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(bundle_dir, tmp)
            replace_dir(tmp, target)
    except OSError as err:
        raise OutputError(f"cannot write the trained model to {out}: {err}") from None


def _write_training_report(config: RunConfig, method: Method = Method.LDM) -> None:
    """``group_training.html``; a failure here is logged, never fatal."""
    try:
        from ..methods import RISH_GLOBAL_MODEL_FILE
        from ..reports.training import build_training_report

        name = RISH_GLOBAL_MODEL_FILE if method is Method.RISH_GLOBAL else "config.json"
        model_file = group_model_dir(config, method) / name
        cfg = json.loads(model_file.read_text()) if model_file.is_file() else None
        path = build_training_report(config.output_dir, config=cfg, logger=LOGGER)
        LOGGER.info("group: training report %s", path)
    except Exception as err:  # noqa: BLE001 - the report must never fail the training
        LOGGER.warning("group: training report not written: %s", err)


# ---------------------------------------------------------------------------------------------
# validation gate


def validation_pairs(config: RunConfig, runs: Sequence[DWIRun], labels: Sequence[str], shell: float) -> list:
    """:class:`~bids_dmri_ldm.evaluation.gate.ValidationPair` of each held-out participant: the
    3T and 7T runs training used, and the 3T run's cached RISH features of ``shell``."""
    from ..bidsio.layout import SOURCE, TARGET
    from ..evaluation.gate import ValidationPair

    chosen = feature_runs(runs)
    pairs = []
    for label in labels:
        source, target = chosen[SOURCE][label], chosen[TARGET][label]
        rish, mask, affine = shell_rish(source, config, shell)
        pairs.append(ValidationPair(label, source.session, source.dwi, source.bval, source.bvec,
                                    target.dwi, target.bval, target.bvec, rish, mask, affine))
    return pairs


def rish_global_baseline(config: RunConfig, runs: Sequence[DWIRun], labels: Sequence[str], shell: float):
    """``rish-global`` fitted on the given (training) participants' cached features of ``shell``."""
    from ..bidsio.layout import SOURCE, TARGET
    from ..methods import RishGlobalMethod

    chosen = feature_runs(runs)
    pairs = [RishPair(*shell_rish(chosen[SOURCE][p], config, shell), *shell_rish(chosen[TARGET][p], config, shell),
                      label=p) for p in labels]
    return RishGlobalMethod(fit_rish_global(pairs, shell=shell, sh_order_max=config.sh_order_max))


def run_gate(config: RunConfig, model_name: str, model, runs: Sequence[DWIRun], train_ids: Sequence[str],
             val_ids: Sequence[str], shell: float | None = None) -> dict[str, Any] | None:
    """Score the new ``model`` beside identity, rish-global (fitted on ``train_ids``) and the
    untouched 3T scan on the held-out ``val_ids`` (:mod:`bids_dmri_ldm.evaluation.gate`), on one
    shell (``shell``; default: the training shell).

    Returns the validation table, or None (with a warning) when there is no held-out participant or
    the gate cannot run; warns, naming the columns, when the model loses to identity.
    """
    from ..evaluation.gate import column_label, score_pair, summarise_rows
    from ..methods import IdentityMethod

    if not val_ids:
        LOGGER.warning("group: no held-out validation participant (need >= 2 pairs): the %s model is not "
                       "validated against identity", model_name)
        return None
    shell = config.training_shell if shell is None else float(shell)
    translators = {"identity": IdentityMethod()}
    try:
        if model_name != Method.RISH_GLOBAL.value:
            translators[Method.RISH_GLOBAL.value] = rish_global_baseline(config, runs, train_ids, shell)
        translators[model_name] = model
        rows = []
        for pair in validation_pairs(config, runs, val_ids, shell):
            LOGGER.info("group: validation gate, sub-%s", pair.participant)
            rows += score_pair(pair, translators, truth_root=config.bids_dir, shell=shell,
                               tolerance=config.shell_tolerance, sh_order_max=config.sh_order_max)
    except Exception as err:  # noqa: BLE001 - the gate informs; it never loses the trained model
        LOGGER.warning("group: the validation gate could not run (%s): the %s model is not validated", err, model_name)
        return None
    table = summarise_rows(rows, model_name)
    losses = table["loses_to_identity"]
    if losses:
        LOGGER.warning("group: the new %s model LOSES to identity on %d held-out participant(s) in %s; "
                       "see MODEL_CARD.md (participant runs with it will carry this warning)", model_name,
                       table["n_participants"], ", ".join(column_label(c) for c in losses))
    else:
        LOGGER.info("group: the new %s model is not worse than identity in any column on %d held-out "
                    "participant(s)", model_name, table["n_participants"])
    return table


def _gate_bundle(config: RunConfig, method: Method, bundle_dir: Path | None, runs: Sequence[DWIRun]) -> None:
    """Run the gate on a freshly trained ldm/cnn bundle and record the table in it."""
    if bundle_dir is None:
        return
    from ..evaluation.gate import table_markdown
    from ..methods import load_method
    from ..ml.bundle import attach_validation

    model = load_method(method, bundle_dir, {"device": config.device, "seed": config.seed})
    data = model.bundle.config["training_data"]
    table = run_gate(config, method.value, model, runs, data["train_participants"],
                     data["validation_participants"])
    if table is not None:
        attach_validation(bundle_dir, table, table_markdown(table))


def train_cnn(config: RunConfig, runs: Sequence[DWIRun]) -> int:
    """Group-level training of the cnn baseline (:func:`bids_dmri_ldm.ml.cnn.train_cnn`).

    Writes ``<output_dir>/models/cnn/`` (bundle), ``<output_dir>/training/losses_cnn.{csv,png}``
    and ``<output_dir>/group_training.html``.
    """
    from ..ml.cnn import train_cnn as train_cnn_bundle
    from ..ml.device import resolve_device
    from ..ml.training import TrainingDataError
    from ..reports.training import plot_losses

    if config.stage not in (None, ALL_STAGES):
        raise UsageError(f"--stage {config.stage} is an ldm stage; --method cnn trains in one stage (omit --stage)")
    from ..ml.modelconfig import trained_for

    train_cfg = _load_train_config(config, Method.CNN)
    train_cfg["trained_for"] = trained_for(training_shell(config, Method.CNN), config.sh_order_max, train_cfg["orders"])
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
    device = resolve_device(config.device)
    work = Path(config.work_dir) / "cnn_training" / train_cfg["name"]
    staging = Path(config.work_dir) / "cnn_training" / "out"
    command = " ".join(["bids-dmri-ldm", *sys.argv[1:]]) if sys.argv else ""
    try:
        bundle_dir = train_cnn_bundle(rish_3t, rish_7t, train_cfg, staging, work, device=device,
                                      resume=bool(config.resume), command=command, plot_losses=plot_losses)
    except TrainingDataError as err:
        raise NoDataError(f"cnn training: {err}") from None
    _gate_bundle(config, Method.CNN, bundle_dir, runs)
    _publish_training_outputs(config, staging, bundle_dir, Method.CNN)
    _write_examples(config, Method.CNN, train_cfg, rish_3t, rish_7t, device)
    _write_training_report(config, Method.CNN)
    LOGGER.info("group: cnn model bundle -> %s (use it with --method cnn --model-dir %s)",
                group_model_dir(config, Method.CNN), Path(config.output_dir) / "models")
    return EX_OK


GROUP_TRAINERS: dict[Method, Callable[[Any, Sequence[Any]], int]] = {
    Method.IDENTITY: _no_training(Method.IDENTITY),
    Method.RISH_GLOBAL: train_rish_global,
    Method.LDM: train_ldm,
    Method.CNN: train_cnn,
}
"""Method -> group-level trainer ``(config, runs) -> exit status``."""


def run_group(config: RunConfig, runs: Sequence[DWIRun]) -> int:
    """Group level entry point called by the command line; returns the exit status.

    The runs were selected before (an empty selection is exit 18); a selection that holds no
    3T/7T pair cannot train any method: a data error (65) naming what was found.
    """
    try:
        return GROUP_TRAINERS[Method(config.method)](config, runs)
    except NoDataError as err:
        raise BadDataError(str(err)) from None

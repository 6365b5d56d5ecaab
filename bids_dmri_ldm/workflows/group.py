"""Group level: learn a translation model from paired 3T (source) / 7T (target) participants.

:func:`run_group` dispatches on ``--method`` through :data:`GROUP_TRAINERS`; each trainer takes
the run configuration and every selected run, and returns an exit status. The trained model is
written to ``<output_dir>/models/<method>/`` (listed in ``.bidsignore``); use it at the
participant level with ``--model-dir <output_dir>/models``.

``rish-global``: for each shell (``--shell``; default: every shell the training pairs' 3T and
7T runs share, :func:`common_shells`), the RISH maps of both runs of every pair are computed with
the same steps as the participant level (shell clustering, mask, S/S0, least-squares SH per
shell, Eq. 1), the source maps are resampled onto the target grid through the two affines (same
head, same scanner space), and the factor of each order is the ratio of the brain means,
sqrt(sum RISH_l^7T / sum RISH_l^3T) over the brain voxels of all pairs (outliers of the voxel-wise
lambda_l of Eq. 2 left out; :func:`bids_dmri_ldm.ml.rish_global.fit_rish_global_shells`): one model file holds the factors of
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

The RISH features and their cache are in :mod:`.group_features`, the validation gate in
:mod:`.group_gate`.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..bidsio import dataset as bids_dataset
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
from ..io.files import atomic_path, replace_dir
from ..methods import Method, save_rish_global_model
from ..ml.rish_global import RishPair, fit_rish_global_shells
from ..vocabulary import ALL_STAGES, LDM_STAGES
from .group_features import (
    cached_run_rish,
    collect_ldm_features,
    common_shells,
    training_shell,
)
from .group_gate import gate_bundle, run_gate

if TYPE_CHECKING:  # pragma: no cover
    from ..bidsio.layout import DWIRun
    from ..config import RunConfig

LOGGER = logging.getLogger("bids_dmri_ldm.group")


def group_model_dir(config: RunConfig, method: Method) -> Path:
    """Where the group level writes the model of ``method``."""
    return Path(config.output_dir) / "models" / method.value


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
        bids_dataset.init_derivatives_dataset(config.output_dir, config.bids_dir)
    except bids_dataset.OutputWriteError as err:
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
        extra_training={"runs": described, "dataset": bids_dataset.source_dataset(config.bids_dir),
                        "participants": train_ids, "validation_participants": val_ids,
                        "software": bids_dataset.software_versions(),
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
        return bids_dataset.bids_uri(run.dwi, config.bids_dir)
    except ValueError:
        return str(run.dwi)


def _no_training(method: Method) -> Callable[..., int]:
    def trainer(config, runs) -> int:
        raise UsageError(f"--method {method.value} has nothing to learn at the group level; "
                         "use --method rish-global, ldm or cnn")
    return trainer


# ---------------------------------------------------------------------------------------------
# ldm

DEFAULT_TRAIN_CONFIGS = {Method.LDM: "demo", Method.CNN: "cnn-demo"}
"""Training config of each learned method when ``--config`` is not given."""


def _learned_features(config: RunConfig, runs: Sequence[DWIRun], train_cfg: dict[str, Any]):
    """Derivative root created, then every participant's RISH features of the training shell
    (:func:`~.group_features.collect_ldm_features`) for an ldm/cnn training; ``--seed`` set in
    ``train_cfg``. Returns ``(rish_3t, rish_7t)``."""
    try:
        bids_dataset.init_derivatives_dataset(config.output_dir, config.bids_dir)
    except bids_dataset.OutputWriteError as err:
        raise OutputError(str(err)) from None
    stats: dict[str, int] = {}
    rish_3t, rish_7t = collect_ldm_features(config, runs, stats)
    LOGGER.info("group: RISH features of %d 3T and %d 7T participant(s) (%d computed, %d from the cache)",
                len(rish_3t), len(rish_7t), stats.get("computed", 0), stats.get("reused", 0))
    if config.seed:
        train_cfg["training"]["seed"] = int(config.seed)
    return rish_3t, rish_7t


def _training_dirs(config: RunConfig, folder: str, train_cfg: dict[str, Any]) -> tuple[Path, Path, str]:
    """Work folder of a training (``<work_dir>/<folder>/<config name>``), its staging folder
    (``<work_dir>/<folder>/out``) and the command line recorded in the model card."""
    work = Path(config.work_dir) / folder / train_cfg["name"]
    staging = Path(config.work_dir) / folder / "out"
    command = " ".join(["bids-dmri-ldm", *sys.argv[1:]]) if sys.argv else ""
    return work, staging, command


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
    rish_3t, rish_7t = _learned_features(config, runs, train_cfg)
    # what the bundle is trained for; the participant level refuses other data (config.json)
    train_cfg["trained_for"] = trained_for(shell, config.sh_order_max, train_cfg["orders"])
    device = resolve_device(config.device)
    work, staging, command = _training_dirs(config, "ldm_training", train_cfg)
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
    gate_bundle(config, Method.LDM, bundle_dir, runs)
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
    rish_3t, rish_7t = _learned_features(config, runs, train_cfg)
    device = resolve_device(config.device)
    work, staging, command = _training_dirs(config, "cnn_training", train_cfg)
    try:
        bundle_dir = train_cnn_bundle(rish_3t, rish_7t, train_cfg, staging, work, device=device,
                                      resume=bool(config.resume), command=command, plot_losses=plot_losses)
    except TrainingDataError as err:
        raise NoDataError(f"cnn training: {err}") from None
    gate_bundle(config, Method.CNN, bundle_dir, runs)
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

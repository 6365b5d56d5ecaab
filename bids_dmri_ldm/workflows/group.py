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
The ``ldm`` trainer plugs in as one more entry of :data:`GROUP_TRAINERS`.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from ..bids import derivatives as deriv
from ..cli.exitcodes import EX_OK, BadDataError, OutputError, UsageError
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
                         "use --method rish-global (or ldm once available)")
    return trainer


def _ldm_unavailable(config, runs) -> int:
    raise UsageError("ldm training is not available in this version; use --method rish-global")


GROUP_TRAINERS: dict[Method, Callable[[Any, Sequence[Any]], int]] = {
    Method.IDENTITY: _no_training(Method.IDENTITY),
    Method.RISH_GLOBAL: train_rish_global,
    Method.LDM: _ldm_unavailable,  # replaced by the LDM trainer (its own issue)
}
"""Method -> group-level trainer ``(config, runs) -> exit status``."""


def run_group(config: RunConfig, runs: Sequence[DWIRun]) -> int:
    """Group level entry point called by the command line; returns the exit status."""
    return GROUP_TRAINERS[Method(config.method)](config, runs)

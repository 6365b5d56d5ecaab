"""Planning one participant-level run before any work: its settings, its options, the fate of
its volumes, its output names and its memory (a run that cannot be processed is refused here,
with a one-line reason).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("NIPYPE_NO_ET", "1")

import nibabel as nib

from ..bidsio import dataset as bids_dataset
from ..bidsio import derivatives as deriv
from ..core.resample import grid_changes, output_grid
from ..errors import (
    InputDataError,
    ResourceError,
)
from ..interfaces.steps import (
    InputSummary,
    ShellOptions,
    check_run_inputs,
)
from ..methods import (
    MethodOptions,
    trained_shells,
)
from .resources import NIFTI1_MAX_DIM, MemoryEstimate, estimate_run_memory, format_bytes

if TYPE_CHECKING:  # pragma: no cover
    from ..bidsio.layout import DWIRun
    from ..config import RunConfig

LOGGER = logging.getLogger("bids_dmri_ldm.workflow")


@dataclass
class RunPlan:
    """Everything decided about one run before the workflow is built."""

    run: Any  # DWIRun
    outputs: deriv.RunOutputs
    summary: InputSummary
    res_label: str | None
    resolution: str | None
    sources: list[str]
    spatial_reference: str
    wf_name: str
    options: ShellOptions = field(default_factory=ShellOptions)
    memory: MemoryEstimate = field(default_factory=MemoryEstimate)
    # the run's existing derivatives before this attempt: {path: (inode, mtime_ns)}
    before: dict[Path, tuple[int, int]] = field(default_factory=dict)


def run_settings(config: RunConfig, model_sha256: str | None) -> dict[str, Any]:
    """Settings recorded in every sidecar and compared on reruns (a change means: redo)."""
    return {
        "Method": str(config.method),
        "ModelSHA256": model_sha256,
        "Shells": None if config.shells is None else [float(b) for b in config.shells],
        "ShellTolerance": float(config.shell_tolerance),
        "OutputGradients": output_gradients_record(config),
        "SHOrderMax": int(config.sh_order_max),
        "OutputResolution": None if config.output_resolution is None else float(config.output_resolution),
        "SkullStrip": bool(config.skull_strip),
    }


def output_gradients_record(config: RunConfig) -> dict[str, Any] | None:
    """Where the output table comes from (``Settings.OutputGradients`` of the sidecars): the
    ``--output-gradients`` files' names and SHA-256 (not their paths: no mount point is
    recorded); None when the output keeps the input's table."""
    if not config.output_gradients:
        return None
    from ..bundles import sha256_file

    bval, bvec = (Path(p) for p in config.output_gradients)
    return {"BVal": bval.name, "BVec": bvec.name, "BValSHA256": sha256_file(bval), "BVecSHA256": sha256_file(bvec)}


def shell_options(config: RunConfig, translator: Any = None) -> ShellOptions:
    """How every run's shells are treated: ``--shell``, ``--shell-tolerance``, ``--sh-order``,
    ``--output-gradients`` and the shells the method's model covers (``translator``: a loaded
    method or its :class:`~bids_dmri_ldm.methods.ModelInfo`)."""
    covered = trained_shells(translator) if translator is not None else None
    record = output_gradients_record(config)
    return ShellOptions(
        tolerance=float(config.shell_tolerance), sh_order_max=int(config.sh_order_max),
        shells=None if config.shells is None else tuple(float(b) for b in config.shells),
        covered=None if covered is None else tuple(covered),
        model_label=f"the {config.method} model",
        output_bval=str(config.output_gradients[0]) if config.output_gradients else None,
        output_bvec=str(config.output_gradients[1]) if config.output_gradients else None,
        output_sha256=None if record is None else record["BValSHA256"] + record["BVecSHA256"])


def method_options(config: RunConfig) -> MethodOptions:
    """Options handed to the method loader (used by ``ldm``/``cnn``; ignored by the others)."""
    return MethodOptions(device=config.device, seed=int(config.seed), num_samples=int(config.num_samples),
                         ddim_steps=config.ddim_steps, t0=config.t0, guidance=config.guidance,
                         scale_reference=config.scale_reference, scale_smoothing=config.scale_smoothing,
                         omp_nthreads=int(config.omp_nthreads), precision=config.precision)


def _uri(path, root) -> str:
    try:
        return bids_dataset.bids_uri(path, root)
    except ValueError:  # outside the dataset (e.g. a mask from another derivative dataset)
        return Path(path).resolve().as_uri()


def plan_run(run: DWIRun, config: RunConfig, memory_limit: int | None = None, model_bytes: int = 0,
             options: ShellOptions | None = None) -> RunPlan:
    """Check a run from its header/gradients, decide what happens to each of its shells,
    estimate its memory and decide its output names.

    Parameters
    ----------
    memory_limit : int, optional
        Bytes one run may use (``--mem-gb`` or the memory available); None: not checked.
    model_bytes : int
        Size of the model's weight files (part of the memory estimate).
    options : ShellOptions, optional
        :func:`shell_options` (default: from ``config``, every shell covered).

    Raises
    ------
    InputDataError
        The run cannot be processed (see :func:`~bids_dmri_ldm.interfaces.steps.check_run_inputs`),
        or its output grid cannot be stored in NIfTI-1 (an axis over 32767 voxels).
    ResourceError
        The run needs more memory than ``memory_limit`` (the message says how much and what to change).
    """
    summary = check_run_inputs(run.dwi, run.bval, run.bvec, options or shell_options(config))
    res_label = resolution = None
    if config.output_resolution is not None and grid_changes(summary.affine, summary.shape, config.output_resolution):
        res_label = deriv.resolution_label(config.output_resolution)
        resolution = (f"Resampled to {config.output_resolution:g} mm isotropic voxels (cubic B-spline; brain mask "
                      "linear + threshold 0.5), same field of view and axis directions as the source")
    memory = _check_memory(run, summary, config, res_label is not None, memory_limit, model_bytes)
    try:
        outputs = deriv.run_outputs(config.output_dir, run.dwi, getattr(run, "entities", None), res_label)
    except ValueError as err:  # a label pybids accepted but BIDS does not (layout rejects most)
        raise InputDataError(f"{Path(run.dwi).name}: {err}") from None
    sources = [_uri(p, config.bids_dir) for p in (run.dwi, run.bval, run.bvec, getattr(run, "mask", None)) if p]
    wf_name = re.sub(r"[^0-9a-zA-Z]", "_", outputs.run_id) + "_wf"
    return RunPlan(run=run, outputs=outputs, summary=summary, res_label=res_label, resolution=resolution,
                   sources=sources, spatial_reference=_uri(run.dwi, config.bids_dir), wf_name=wf_name,
                   options=options or shell_options(config), memory=memory)


def _check_memory(run, summary: InputSummary, config: RunConfig, resampled: bool, memory_limit: int | None,
                  model_bytes: int) -> MemoryEstimate:
    """The run's memory estimate (:mod:`.resources`); refuse grids NIfTI-1 cannot store and runs
    that cannot fit in ``memory_limit``."""
    name = Path(run.dwi).name
    voxel_size = config.output_resolution if resampled else None
    _, out_shape = output_grid(summary.affine, summary.shape[:3], voxel_size)
    plan = summary.plan
    n_kept = int(plan.read_index.size)
    if max(out_shape) > NIFTI1_MAX_DIM:
        raise InputDataError(
            f"{name}: at {voxel_size:g} mm the output grid would be {_shape_text(out_shape)} voxels; NIfTI-1 "
            f"stores at most {NIFTI1_MAX_DIM} per axis (check the voxel sizes in the header, or use a coarser "
            "--output-resolution)")
    itemsize = nib.load(str(run.dwi)).get_data_dtype().itemsize
    memory = estimate_run_memory(summary.shape, itemsize, n_kept, config.sh_order_max, out_shape, model_bytes,
                                 shell_volumes=max((p.shell.n_volumes for p in plan.fitted), default=0),
                                 n_b0=int(plan.b0_index.size), n_fitted=len(plan.fitted))
    if memory_limit is not None and memory.peak > memory_limit:
        if resampled:
            native = min(summary.voxel_size)
            change = (f"use a coarser --output-resolution (e.g. 1.05, or 'native' = {native:g} mm)"
                      f", more memory (--mem-gb), or another machine")
            grid = f"at {voxel_size:g} mm the output grid is {_shape_text(out_shape)} voxels x {n_kept} volumes"
        else:
            change = "run it on a machine with more memory (or raise --mem-gb if more is free)"
            grid = f"the grid is {_shape_text(out_shape)} voxels x {n_kept} volumes"
        raise ResourceError(
            f"{name}: {grid}; this run needs about {format_bytes(memory.peak)} of memory but "
            f"{format_bytes(memory_limit)} is available; {change}")
    return memory


def _shape_text(shape) -> str:
    return "x".join(str(int(n)) for n in shape)

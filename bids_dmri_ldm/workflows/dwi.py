"""Participant-level workflow of one DWI run: 3T DWI -> 7T-like DWI via RISH scale maps."""
from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from ..interfaces.dwi import (
    BrainMask,
    FitRISH,
    LoadDWI,
    PredictScaleMaps,
    RebuildDWI,
    ResampleImage,
    ResampleToGrid,
    ScaleSH,
    SelectShell,
)

INPUT_FIELDS = ["dwi_file", "bval_file", "bvec_file", "mask_file"]
OUTPUT_FIELDS = ["dwi_file", "bval_file", "bvec_file", "mask_file", "rish_source_file",
                 "rish_predicted_file", "scale_file", "provenance", "rish_std_file", "warnings"]


def writes_std_map(method: str, method_options: dict | None) -> bool:
    """Whether the run produces the per-voxel SD map (``ldm`` with ``num_samples`` > 1)."""
    return str(method) == "ldm" and int((method_options or {}).get("num_samples") or 1) > 1


def init_dwi_7tlike_wf(
    *,
    method: str,
    model_dir: str | None = None,
    method_options: dict | None = None,
    shell: float = 1000.0,
    shell_tolerance: float = 100.0,
    sh_order_max: int = 4,
    output_resolution: float | None = 1.05,
    skull_strip: bool = False,
    omp_nthreads: int = 1,
    name: str = "dwi_7tlike_wf",
) -> pe.Workflow:
    """Translate one source DWI run into a 7T-like DWI (Zhu et al. 2024, Eq. 1-3).

    Steps: select the b0s and the shell near ``shell`` (checking the gradient table) -> read
    those volumes and sanitise NaN/Inf -> brain mask (given, resampled onto the DWI grid when
    needed; or the automatic mask of :mod:`bids_dmri_ldm.core.mask`) and, independently,
    normalise S/S0 + SH fit + RISH (Eq. 1) in every voxel -> the method's scale maps lambda
    (Eq. 2), 1 outside the mask -> resample S0, SH, lambda and mask to ``output_resolution``
    (cubic B-spline; the mask linear + 0.5 threshold) -> scale SH (Eq. 3; lambda = 1 outside the
    mask) and take source/predicted RISH there -> rebuild on the source directions in every
    voxel, the b0 volumes resampled one by one as the output is streamed to disk. The mask only
    decides where lambda may differ from 1: no voxel of the field of view is lost, unless
    ``skull_strip``. Only file paths pass between nodes; the largest array held is the SH
    coefficients on the output grid (see docs/performance.md).

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from bids_dmri_ldm.workflows.dwi import init_dwi_7tlike_wf
            wf = init_dwi_7tlike_wf(method="identity")

    Parameters
    ----------
    method : str
        Registered translation method (:class:`bids_dmri_ldm.methods.Method`).
    model_dir : str or None
        Model directory (``None``: the shipped default of the method).
    method_options : dict or None
        Options passed to the method's loader (device, seed, sampling settings).
    shell, shell_tolerance : float
        b-value (s/mm²) of the shell to translate and the tolerance around it.
    sh_order_max : int
        Highest SH order of the fit (4 gives RISH L0, L2, L4).
    output_resolution : float or None
        Isotropic voxel size (mm) of the outputs; ``None`` keeps the input grid.
    skull_strip : bool
        Zero the output DWI and RISH maps outside the brain mask (default: keep every voxel).
    omp_nthreads : int
        Threads a node may use (numpy/torch), declared to nipype's scheduler.
    name : str
        Workflow name.

    Inputs
    ------
    dwi_file
        Source 4D DWI (NIfTI).
    bval_file, bvec_file
        Its gradient table (``None`` when missing: the run then fails with a clear message).
    mask_file
        A given brain mask (any grid overlapping the DWI), or ``None`` to compute one.

    Outputs
    -------
    dwi_file, bval_file, bvec_file
        7T-like DWI on the output grid (b0 volumes first, then the shell) and its FSL table.
    mask_file
        Brain mask on the output grid.
    rish_source_file, rish_predicted_file, scale_file
        Source RISH, predicted RISH and scale maps on the output grid, ``(X, Y, Z, 3)``.
    provenance
        The method's provenance dictionary.
    warnings
        One-line warnings raised during the run (dropped volumes, shell tolerance used, NaN/Inf
        voxels, a given mask that is not binary), recorded in the DWI sidecar as ``RunWarnings``.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=INPUT_FIELDS), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=OUTPUT_FIELDS), name="outputnode")

    select_shell = pe.Node(SelectShell(shell=shell, shell_tolerance=shell_tolerance, sh_order_max=sh_order_max),
                           name="select_shell")
    load_dwi = pe.Node(LoadDWI(), name="load_dwi")
    brain_mask = pe.Node(BrainMask(), name="brain_mask")
    fit_rish = pe.Node(FitRISH(sh_order_max=sh_order_max), name="fit_rish", n_procs=omp_nthreads)
    predict_scale = pe.Node(PredictScaleMaps(method=method, model_dir=model_dir, options=dict(method_options or {})),
                            name="predict_scale", n_procs=omp_nthreads)

    resample = pe.Node(ResampleToGrid(voxel_size=output_resolution), name="resample")
    scale_sh = pe.Node(ScaleSH(sh_order_max=sh_order_max, skull_strip=skull_strip), name="scale_sh")
    rebuild = pe.Node(RebuildDWI(sh_order_max=sh_order_max, skull_strip=skull_strip), name="rebuild")

    workflow.connect([
        (inputnode, select_shell, [("dwi_file", "dwi_file"), ("bval_file", "bval_file"), ("bvec_file", "bvec_file")]),
        (inputnode, load_dwi, [("dwi_file", "dwi_file")]),
        (select_shell, load_dwi, [("index", "index"), ("n_b0", "n_b0")]),
        (inputnode, brain_mask, [("mask_file", "in_mask")]),
        (load_dwi, brain_mask, [("mean_b0_file", "mean_b0_file"), ("mean_dwi_file", "mean_dwi_file"),
                                ("bad_voxels_file", "bad_voxels_file"), ("warnings", "prior_warnings")]),
        (load_dwi, fit_rish, [("dwi_file", "dwi_file")]),
        (select_shell, fit_rish, [("bval_file", "bval_file"), ("bvec_file", "bvec_file")]),
        (fit_rish, predict_scale, [("rish_file", "rish_file")]),
        (brain_mask, predict_scale, [("mask_file", "mask_file")]),
        (fit_rish, resample, [("s0_file", "s0_file"), ("sh_file", "sh_file")]),
        (predict_scale, resample, [("scale_file", "scale_file")]),
        (brain_mask, resample, [("mask_file", "mask_file")]),
        (resample, scale_sh, [("sh_file", "sh_file"), ("scale_file", "scale_file"), ("mask_file", "mask_file")]),
        (resample, rebuild, [("s0_file", "s0_file"), ("mask_file", "mask_file")]),
        (fit_rish, rebuild, [("b0_file", "b0_file")]),
        (load_dwi, rebuild, [("integer_input", "integer_output")]),
        (scale_sh, rebuild, [("sh_file", "sh_file")]),
        (select_shell, rebuild, [("bval_file", "bval_file"), ("bvec_file", "bvec_file")]),
        (rebuild, outputnode, [("dwi_file", "dwi_file"), ("bval_file", "bval_file"), ("bvec_file", "bvec_file"),
                               ("mask_file", "mask_file")]),
        (scale_sh, outputnode, [("rish_source_file", "rish_source_file"),
                                ("rish_predicted_file", "rish_predicted_file"), ("scale_file", "scale_file")]),
        (predict_scale, outputnode, [("provenance", "provenance")]),
        (select_shell, load_dwi, [("warnings", "prior_warnings")]),
        (brain_mask, outputnode, [("warnings", "warnings")]),
    ])  # fmt: skip
    if writes_std_map(method, method_options):
        resample_std = pe.Node(ResampleImage(voxel_size=output_resolution, clip_min=0.0), name="resample_std")
        workflow.connect([
            (predict_scale, resample_std, [("std_file", "in_file")]),
            (resample_std, outputnode, [("out_file", "rish_std_file")]),
        ])  # fmt: skip
    return workflow

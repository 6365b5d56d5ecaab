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
    ResampleToGrid,
    ScaleSH,
    SelectShells,
)
from ..methods.base import MethodOptions

INPUT_FIELDS = ["dwi_file", "bval_file", "bvec_file", "mask_file"]
OUTPUT_FIELDS = ["dwi_file", "bval_file", "bvec_file", "mask_file", "rish_source_file",
                 "rish_predicted_file", "scale_file", "provenance", "rish_std_file", "warnings",
                 "shell_map_files"]


def writes_std_map(method: str, method_options: MethodOptions | None) -> bool:
    """Whether the run produces the per-voxel SD map (``ldm`` with ``num_samples`` > 1)."""
    return str(method) == "ldm" and int((method_options or MethodOptions()).num_samples or 1) > 1


def init_dwi_7tlike_wf(
    *,
    method: str,
    model_dir: str | None = None,
    model_sha256: str | None = None,
    method_options: MethodOptions | None = None,
    shell_options: dict | None = None,
    sh_order_max: int = 4,
    output_resolution: float | None = 1.05,
    skull_strip: bool = False,
    omp_nthreads: int = 1,
    name: str = "dwi_7tlike_wf",
) -> pe.Workflow:
    """Translate one source DWI run into a 7T-like DWI (Zhu et al. 2024, Eq. 1-3), every shell.

    Steps: decide what happens to each volume (:func:`~bids_dmri_ldm.core.shells.plan_volumes`:
    the shells, which are translated or passed through, the output table) -> read the volumes
    needed (streamed) and sanitise NaN/Inf -> brain mask (given, resampled onto the DWI grid
    when needed; or the automatic mask of :mod:`bids_dmri_ldm.core.mask`) and, independently,
    per shell: normalise S/S0 + SH fit + RISH (Eq. 1) in every voxel -> per shell, the method's
    scale maps lambda (Eq. 2) where the shell is translated, 1 where it is passed through (and
    outside the mask) -> resample S0, SH, lambda and mask to ``output_resolution`` (cubic
    B-spline; the mask linear + 0.5 threshold) -> two steps side by side: per shell, scale SH
    (Eq. 3) and take source/predicted RISH there; and write the output table volume by volume:
    rebuilt from its shell's SH, scaled the same way, on its direction, or an input b0 (or a
    volume of a shell with too few directions) resampled, or the mean b0 (a given table's b0
    rows). The mask only decides where lambda may differ from 1: no voxel of the field of view
    is lost, unless ``skull_strip``.
    Only file paths pass between nodes; shells are processed one at a time inside each node
    (see docs/performance.md).

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
    model_sha256 : str or None
        SHA-256 of the model's checksum list (:attr:`~bids_dmri_ldm.methods.ModelInfo.sha256`):
        an input of the scale-map node, so a model replaced in the same folder is not served from
        the work folder's cache.
    method_options : MethodOptions or None
        Options passed to the method's loader (device, seed, sampling settings); they cross
        the graph as :meth:`~bids_dmri_ldm.methods.MethodOptions.to_json` (None: the defaults).
    shell_options : dict or None
        :meth:`bids_dmri_ldm.interfaces.steps.ShellOptions.to_dict`: shell tolerance, SH order,
        ``--shell``, the model's shells, ``--output-gradients`` (None: the defaults).
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
        7T-like DWI on the output grid and table and its FSL table.
    mask_file
        Brain mask on the output grid.
    rish_source_file, rish_predicted_file, scale_file
        Source RISH, predicted RISH and scale maps on the output grid, ``(X, Y, Z, 3 n_shells)``:
        three volumes (L0, L2, L4) per fitted shell, ascending b.
    provenance
        The method's provenance dictionary, with ``Shells`` (one record per input shell).
    warnings
        One-line warnings raised during the run (shells passed through or carried, NaN/Inf
        voxels, a given mask that is not binary), recorded in the DWI sidecar as ``RunWarnings``.
    shell_map_files
        The uncompressed per-shell maps the three maps were stacked from: not derivatives; the
        participant report reads the maps from them (recorded in ``map_copies.json`` beside the
        RISH-map step's folder).
    """
    options = dict(shell_options or {"tolerance": 100.0, "sh_order_max": sh_order_max})
    options["sh_order_max"] = int(sh_order_max)
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=INPUT_FIELDS), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=OUTPUT_FIELDS), name="outputnode")

    select_shells = pe.Node(SelectShells(options=options), name="select_shells")
    load_dwi = pe.Node(LoadDWI(), name="load_dwi")
    brain_mask = pe.Node(BrainMask(), name="brain_mask")
    fit_rish = pe.Node(FitRISH(sh_order_max=sh_order_max), name="fit_rish", n_procs=omp_nthreads)
    predict_scale = pe.Node(PredictScaleMaps(method=method, model_dir=model_dir, model_sha256=model_sha256,
                                             options=(method_options or MethodOptions()).to_json()),
                            name="predict_scale", n_procs=omp_nthreads)

    resample = pe.Node(ResampleToGrid(voxel_size=output_resolution), name="resample")
    scale_sh = pe.Node(ScaleSH(sh_order_max=sh_order_max, skull_strip=skull_strip), name="scale_sh")
    rebuild = pe.Node(RebuildDWI(sh_order_max=sh_order_max, skull_strip=skull_strip), name="rebuild")

    workflow.connect([
        (inputnode, select_shells, [("dwi_file", "dwi_file"), ("bval_file", "bval_file"),
                                    ("bvec_file", "bvec_file")]),
        (inputnode, load_dwi, [("dwi_file", "dwi_file")]),
        (select_shells, load_dwi, [("plan_file", "plan_file"), ("warnings", "prior_warnings")]),
        (inputnode, brain_mask, [("mask_file", "in_mask")]),
        (load_dwi, brain_mask, [("mean_b0_file", "mean_b0_file"), ("mean_dwi_file", "mean_dwi_file"),
                                ("bad_voxels_file", "bad_voxels_file"), ("warnings", "prior_warnings")]),
        (load_dwi, fit_rish, [("dwi_file", "dwi_file")]),
        (select_shells, fit_rish, [("plan_file", "plan_file")]),
        (fit_rish, predict_scale, [("rish_files", "rish_files")]),
        (brain_mask, predict_scale, [("mask_file", "mask_file")]),
        (select_shells, predict_scale, [("plan_file", "plan_file")]),
        (fit_rish, resample, [("s0_file", "s0_file"), ("sh_files", "sh_files")]),
        (predict_scale, resample, [("scale_files", "scale_files")]),
        (brain_mask, resample, [("mask_file", "mask_file")]),
        (resample, scale_sh, [("sh_files", "sh_files"), ("scale_files", "scale_files"), ("mask_file", "mask_file")]),
        (resample, rebuild, [("s0_file", "s0_file"), ("mask_file", "mask_file"), ("sh_files", "sh_files"),
                             ("scale_files", "scale_files")]),
        (load_dwi, rebuild, [("dwi_file", "dwi_file"), ("mean_b0_file", "mean_b0_file"),
                             ("integer_input", "integer_output")]),
        (select_shells, rebuild, [("plan_file", "plan_file"), ("bval_file", "bval_file"),
                                  ("bvec_file", "bvec_file")]),
        (rebuild, outputnode, [("dwi_file", "dwi_file"), ("bval_file", "bval_file"), ("bvec_file", "bvec_file"),
                               ("mask_file", "mask_file")]),
        (scale_sh, outputnode, [("rish_source_file", "rish_source_file"),
                                ("rish_predicted_file", "rish_predicted_file"), ("scale_file", "scale_file"),
                                # not a derivative: connected so that nipype keeps them for the report
                                ("shell_map_files", "shell_map_files")]),
        (predict_scale, outputnode, [("provenance", "provenance")]),
        (brain_mask, outputnode, [("warnings", "warnings")]),
    ])  # fmt: skip
    if writes_std_map(method, method_options):
        workflow.connect([
            (predict_scale, resample, [("std_files", "std_files")]),
            (resample, scale_sh, [("std_files", "std_files")]),
            (scale_sh, outputnode, [("std_file", "rish_std_file")]),
        ])  # fmt: skip
    return workflow

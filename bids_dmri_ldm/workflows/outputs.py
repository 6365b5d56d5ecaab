"""Derivative writers of one run: DerivativesDataSink nodes only."""
from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from ..interfaces.bids import DerivativesDataSink

INPUT_FIELDS = ["dwi_file", "bval_file", "bvec_file", "mask_file", "rish_source_file",
                "rish_predicted_file", "scale_file", "provenance", "rish_std_file", "warnings"]


def init_ds_7tlike_wf(
    *,
    output_dir: str,
    source_file: str,
    source_entities: dict,
    sources: list[str],
    spatial_reference: str,
    settings: dict,
    seed: int = 0,
    res_label: str | None = None,
    resolution: str | None = None,
    with_std: bool = False,
    skull_strip: bool = False,
    name: str = "ds_7tlike_wf",
) -> pe.Workflow:
    """Write the derivatives of one run (see :mod:`bids_dmri_ldm.bidsio.derivatives` for names).

    The sinks run in a chain (``depends_on``) so that the 7T-like DWI and its sidecar — the run's
    completeness marker — are written last.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from bids_dmri_ldm.workflows.outputs import init_ds_7tlike_wf
            wf = init_ds_7tlike_wf(output_dir="out", source_file="sub-01_dwi.nii.gz", source_entities={},
                                   sources=[], spatial_reference="bids:raw:sub-01_dwi.nii.gz", settings={})

    Parameters
    ----------
    output_dir : str
        Derivative dataset root.
    source_file : str
        Source DWI (its name gives the entities).
    source_entities : dict
        pybids entities of the source run (used only for entities missing from the name).
    sources : list of str
        BIDS URIs of the input files (``Sources``).
    spatial_reference : str
        BIDS URI of the source DWI (``SpatialReference``).
    settings : dict
        Run settings recorded in every sidecar and compared on reruns.
    seed : int
        Random seed recorded in the sidecars.
    res_label, resolution : str or None
        ``res-`` label and its ``Resolution`` description when the grid changes.
    with_std : bool
        Also write ``rish_std_file`` (``model-rish_desc-7TlikeStd_dwimap``; ldm with K > 1 samples).
    skull_strip : bool
        The run zeroes the DWI and RISH maps outside the brain mask (sidecars' ``SkullStripped``).

    Inputs
    ------
    dwi_file, bval_file, bvec_file, mask_file, rish_source_file, rish_predicted_file, scale_file
        Outputs of :func:`~bids_dmri_ldm.workflows.dwi.init_dwi_7tlike_wf`.
    provenance
        Method provenance dictionary.
    warnings
        One-line warnings raised during the run (list of str), written to the DWI sidecar as
        ``RunWarnings`` (shown by the participant report).
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=INPUT_FIELDS), name="inputnode")
    common = {"base_directory": str(output_dir), "source_file": str(source_file),
              "source_entities": dict(source_entities), "res_label": res_label, "resolution": resolution,
              "sources": list(sources), "spatial_reference": spatial_reference, "settings": dict(settings),
              "seed": int(seed), "skull_stripped": bool(skull_strip)}

    def sink(kind):
        return pe.Node(DerivativesDataSink(kind=kind, **common), name=f"ds_{kind}", run_without_submitting=True,
                       overwrite=True)  # always rewrite: the files may have been removed since

    ds_rish_source = sink("rish_source")
    ds_rish_predicted = sink("rish_predicted")
    ds_scale = sink("scale")
    ds_mask = sink("mask")
    ds_dwi = sink("dwi")

    workflow.connect([
        (inputnode, ds_rish_source, [("rish_source_file", "in_file"), ("provenance", "provenance")]),
        (inputnode, ds_rish_predicted, [("rish_predicted_file", "in_file"), ("provenance", "provenance")]),
        (inputnode, ds_scale, [("scale_file", "in_file"), ("provenance", "provenance")]),
        (inputnode, ds_mask, [("mask_file", "in_file"), ("provenance", "provenance")]),
        (inputnode, ds_dwi, [("dwi_file", "in_file"), ("bval_file", "in_bval"), ("bvec_file", "in_bvec"),
                             ("provenance", "provenance"), ("warnings", "warnings")]),
        (ds_rish_source, ds_rish_predicted, [("out_file", "depends_on")]),
        (ds_rish_predicted, ds_scale, [("out_file", "depends_on")]),
        (ds_scale, ds_mask, [("out_file", "depends_on")]),
    ])  # fmt: skip
    if with_std:  # ... -> mask -> std -> dwi
        ds_std = sink("rish_std")
        workflow.connect([
            (inputnode, ds_std, [("rish_std_file", "in_file"), ("provenance", "provenance")]),
            (ds_mask, ds_std, [("out_file", "depends_on")]),
            (ds_std, ds_dwi, [("out_file", "depends_on")]),
        ])  # fmt: skip
    else:
        workflow.connect(ds_mask, "out_file", ds_dwi, "depends_on")
    return workflow

"""A DerivativesDataSink-like interface: writes one derivative of a run into the BIDS output.

Entities come from the source file name (plus ``res-`` when the grid changes); the sidecar is
assembled from the method's provenance and the run settings (:mod:`bids_dmri_ldm.bidsio.derivatives`).
"""
from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")

from nipype.interfaces.base import (
    File,
    TraitedSpec,
    isdefined,
    traits,
)

from ..bidsio import derivatives as deriv
from ..methods import MODEL_WARNINGS_KEY
from .base import StepInputSpec, StepInterface


class _DerivativesDataSinkInputSpec(StepInputSpec):
    base_directory = traits.Str(mandatory=True, desc="derivative dataset root (output_dir)")
    source_file = traits.Str(mandatory=True, desc="source DWI file (entities are taken from its name)")
    source_entities = traits.Dict(desc="pybids entities of the source run (fill-ins)")
    res_label = traits.Either(None, traits.Str, default=None, usedefault=True, desc="res- label or None")
    resolution = traits.Either(None, traits.Str, default=None, usedefault=True, desc="Resolution sidecar text")
    kind = traits.Enum(*[spec.key for spec in deriv.OUTPUT_SPECS], mandatory=True, desc="which derivative")
    in_file = File(exists=True, mandatory=True, desc="image to write")
    in_bval = traits.Either(None, File(exists=True), default=None, usedefault=True)
    in_bvec = traits.Either(None, File(exists=True), default=None, usedefault=True)
    sources = traits.List(traits.Str, desc="BIDS URIs of the inputs used")
    spatial_reference = traits.Str(mandatory=True, desc="BIDS URI of the reference image")
    provenance = traits.Dict(mandatory=True, desc="method provenance block")
    settings = traits.Dict(mandatory=True, desc="run settings recorded in the sidecar")
    seed = traits.Int(0, usedefault=True)
    depends_on = traits.List(traits.Any, desc="outputs that must be written before this one (ordering only)")
    warnings = traits.List(traits.Str, desc="warnings raised during the run (sidecar key RunWarnings)")
    skull_stripped = traits.Bool(False, usedefault=True, desc="the run zeroes the DWI and RISH maps outside the mask")


class _DerivativesDataSinkOutputSpec(TraitedSpec):
    out_file = traits.List(traits.Str, desc="files written, sidecar last")


class DerivativesDataSink(StepInterface):
    """Write a run's derivative (NIfTI + JSON, + bval/bvec for the DWI) atomically."""

    input_spec = _DerivativesDataSinkInputSpec
    output_spec = _DerivativesDataSinkOutputSpec

    def _run_step(self, runtime):
        inputs = self.inputs
        entities = inputs.source_entities if isdefined(inputs.source_entities) else None
        outputs = deriv.run_outputs(inputs.base_directory, inputs.source_file, entities, inputs.res_label)
        provenance = deriv.provenance_block(inputs.provenance, inputs.settings, inputs.seed)
        metadata = deriv.sidecar_metadata(
            inputs.kind,
            sources=list(inputs.sources) if isdefined(inputs.sources) else [],
            spatial_reference=inputs.spatial_reference,
            provenance=provenance,
            resolution=inputs.resolution,
            extra=_warnings_block([*(inputs.warnings if isdefined(inputs.warnings) else []),
                                   *inputs.provenance.get(MODEL_WARNINGS_KEY, [])]),
            skull_stripped=bool(inputs.skull_stripped),
        )
        written = deriv.write_derivative(outputs, inputs.kind, inputs.in_file, metadata, inputs.in_bval, inputs.in_bvec)
        self._results["out_file"] = [str(p) for p in written]
        return runtime


#: Sidecar key of the warnings raised while a run was processed (a list of one-line messages;
#: the participant report lists every sidecar key containing "warning").
WARNINGS_KEY = "RunWarnings"


def _warnings_block(warnings) -> dict:
    """``{"RunWarnings": [...]}`` when there are warnings, else ``{}`` (the key is left out).

    Every sidecar of a run gets the model's standing warnings (``ModelWarnings`` of the method's
    provenance, e.g. a model that lost to identity at the group level's validation gate); the
    DWI's also gets the run's own warnings.
    """
    items = [str(w) for w in warnings]
    return {WARNINGS_KEY: list(dict.fromkeys(items))} if items else {}

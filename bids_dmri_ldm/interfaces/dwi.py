"""nipype interfaces of the participant-level DWI steps (thin wrappers of :mod:`.steps`)."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network at run time

from nipype.interfaces.base import (
    File,
    TraitedSpec,
    isdefined,
    traits,
)

from ..methods.base import MethodOptions
from . import steps
from .base import StepInputSpec, StepInterface


def _optional(value):
    return value if isdefined(value) and value not in ("", None) else None


class _SelectShellsInputSpec(StepInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="source 4D DWI")
    bval_file = traits.Either(None, traits.Str, default=None, usedefault=True, desc=".bval (None: missing)")
    bvec_file = traits.Either(None, traits.Str, default=None, usedefault=True, desc=".bvec (None: missing)")
    options = traits.Dict(mandatory=True, desc="steps.ShellOptions.to_dict(): tolerance, SH order, --shell, "
                          "the model's shells, --output-gradients")


class _SelectShellsOutputSpec(TraitedSpec):
    plan_file = File(exists=True, desc="JSON of the run's VolumePlan (what happens to each volume)")
    bval_file = File(exists=True, desc="b-values of the output volumes")
    bvec_file = File(exists=True, desc="FSL bvecs of the output volumes")
    warnings = traits.List(traits.Str, desc="shells passed through or carried (one line each)")


class SelectShells(StepInterface):
    """Check the gradient table against the image and decide what happens to each shell."""

    input_spec = _SelectShellsInputSpec
    output_spec = _SelectShellsOutputSpec
    torch_free = True

    def _run_step(self, runtime):
        self._results.update(steps.select_shells_step(
            self.inputs.dwi_file, _optional(self.inputs.bval_file), _optional(self.inputs.bvec_file),
            dict(self.inputs.options), runtime.cwd))
        return runtime


class _LoadDWIInputSpec(StepInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="source 4D DWI")
    plan_file = File(exists=True, mandatory=True, desc="the run's VolumePlan (volumes to read)")
    prior_warnings = traits.List(traits.Str, desc="warnings of the earlier steps (passed on first)")


class _LoadDWIOutputSpec(TraitedSpec):
    dwi_file = File(exists=True, desc="volumes read (ascending input order): the stored integer type for an "
                    "unscaled integer source, else float32 with NaN/Inf set to 0")
    mean_b0_file = File(exists=True, desc="mean b0 (X, Y, Z)")
    mean_dwi_file = File(exists=True, desc="mean of the lowest shell's volumes (X, Y, Z)")
    bad_voxels_file = File(exists=True, desc="1 where a value was NaN/Inf")
    n_bad_voxels = traits.Int(desc="number of voxels with NaN/Inf")
    warnings = traits.List(traits.Str, desc="prior_warnings, then NaN/Inf voxels masked out (one line each)")
    integer_input = traits.Bool(desc="the source DWI is stored as integers")


class LoadDWI(StepInterface):
    """Read the volumes the run needs (streamed), sanitise NaN/Inf (masked later, with a
    warning); the run's warnings so far (``prior_warnings``) are passed on with its own."""

    input_spec = _LoadDWIInputSpec
    output_spec = _LoadDWIOutputSpec
    torch_free = True

    def _run_step(self, runtime):
        # the record beside the node folder, like the rebuild's report samples
        self._results.update(steps.load_dwi_step(self.inputs.dwi_file, self.inputs.plan_file, runtime.cwd,
                                                 source_record=Path(runtime.cwd).parent / steps.SOURCE_COPY))
        prior = list(self.inputs.prior_warnings) if isdefined(self.inputs.prior_warnings) else []
        self._results["warnings"] = prior + list(self._results.get("warnings", []))
        return runtime


class _BrainMaskInputSpec(StepInputSpec):
    mean_b0_file = File(exists=True, mandatory=True)
    mean_dwi_file = traits.Either(None, File(exists=True), default=None, usedefault=True,
                                  desc="mean DW image (helps the automatic mask tell air from tissue)")
    bad_voxels_file = File(exists=True, mandatory=True)
    in_mask = traits.Either(None, traits.Str, default=None, usedefault=True, desc="a given brain mask")
    prior_warnings = traits.List(traits.Str, desc="warnings of the earlier steps (passed on first)")


class _BrainMaskOutputSpec(TraitedSpec):
    mask_file = File(exists=True)
    n_voxels = traits.Int()
    warnings = traits.List(traits.Str, desc="prior_warnings, then those about a given mask (one line each)")


class BrainMask(StepInterface):
    """The given mask (resampled onto the DWI grid when needed) or the automatic mask of the mean
    b0 (:mod:`bids_dmri_ldm.core.mask`); NaN/Inf voxels removed. The run's warnings so far
    (``prior_warnings``) are passed on with its own."""

    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec
    torch_free = True

    def _run_step(self, runtime):
        self._results.update(steps.brain_mask_step(self.inputs.mean_b0_file, self.inputs.bad_voxels_file,
                                                   runtime.cwd, _optional(self.inputs.in_mask),
                                                   _optional(self.inputs.mean_dwi_file)))
        prior = list(self.inputs.prior_warnings) if isdefined(self.inputs.prior_warnings) else []
        self._results["warnings"] = prior + list(self._results.get("warnings", []))
        return runtime


class _FitRISHInputSpec(StepInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="volumes read (LoadDWI)")
    plan_file = File(exists=True, mandatory=True)
    sh_order_max = traits.Int(4, usedefault=True)


class _FitRISHOutputSpec(TraitedSpec):
    s0_file = File(exists=True, desc="S0 = mean b0, floored (X, Y, Z), every voxel")
    sh_files = traits.List(File(exists=True), desc="SH coefficients of S/S0 (X, Y, Z, K), one per fitted shell")
    rish_files = traits.List(File(exists=True), desc="RISH L0, L2, L4 (X, Y, Z, 3), one per fitted shell")


class FitRISH(StepInterface):
    """Normalise to S/S0, least-squares SH fit, RISH features (Eq. 1) of each shell, in every voxel."""

    input_spec = _FitRISHInputSpec
    output_spec = _FitRISHOutputSpec

    def _run_step(self, runtime):
        self._results.update(steps.fit_rish_step(self.inputs.dwi_file, self.inputs.plan_file,
                                                 self.inputs.sh_order_max, runtime.cwd))
        return runtime


class _PredictScaleMapsInputSpec(StepInputSpec):
    rish_files = traits.List(File(exists=True), mandatory=True, desc="RISH maps, one per fitted shell")
    mask_file = File(exists=True, mandatory=True)
    plan_file = File(exists=True, mandatory=True)
    method = traits.Str(mandatory=True, desc="registered method name (bids_dmri_ldm.methods.Method)")
    model_dir = traits.Either(None, traits.Str, default=None, usedefault=True)
    model_sha256 = traits.Either(None, traits.Str, default=None, usedefault=True,
                                 desc="SHA-256 of the model's checksum list: part of the node's hash, so that a "
                                 "model rewritten in place (the group level's OUT/models) is not served from "
                                 "the work folder's cache")
    options = traits.Str("", usedefault=True, desc="MethodOptions.to_json(): device, seed, sampling settings "
                         "('': the defaults)")


class _PredictScaleMapsOutputSpec(TraitedSpec):
    scale_files = traits.List(File(exists=True), desc="scale maps lambda (X, Y, Z, 3), one per fitted shell")
    provenance = traits.Dict(desc="method provenance for the sidecars, with the Shells records")
    std_files = traits.List(File(exists=True), desc="per-voxel SD of the predicted 7T RISH (X, Y, Z, 3), one per "
                            "fitted shell; ldm with num_samples > 1 only")


class PredictScaleMaps(StepInterface):
    """Scale maps lambda_l (Eq. 2) of each shell: the method's where the shell is translated, 1
    where it is passed through."""

    input_spec = _PredictScaleMapsInputSpec
    output_spec = _PredictScaleMapsOutputSpec

    def _run_step(self, runtime):
        options = MethodOptions.from_json(self.inputs.options)  # typed again, and checked, here
        self._results.update(steps.predict_scale_step(list(self.inputs.rish_files), self.inputs.mask_file,
                                                      self.inputs.method, _optional(self.inputs.model_dir),
                                                      options, self.inputs.plan_file, runtime.cwd))
        return runtime


class _ResampleInputSpec(StepInputSpec):
    s0_file = File(exists=True, mandatory=True, desc="S0 (X, Y, Z)")
    sh_files = traits.List(File(exists=True), desc="SH coefficients (X, Y, Z, K) per shell")
    scale_files = traits.List(File(exists=True), desc="scale maps (X, Y, Z, 3) per shell")
    std_files = traits.List(File(exists=True), desc="ldm SD maps (X, Y, Z, 3) per shell (optional)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask (X, Y, Z)")
    voxel_size = traits.Either(None, traits.Float, default=None, usedefault=True, desc="mm; None keeps the grid")


class _ResampleOutputSpec(TraitedSpec):
    s0_file = File(exists=True)
    sh_files = traits.List(File(exists=True))
    scale_files = traits.List(File(exists=True))
    std_files = traits.List(File(exists=True))
    mask_file = File(exists=True)


class ResampleToGrid(StepInterface):
    """Resample S0, each shell's SH, scale maps (and SD maps) (cubic B-spline; S0, lambda and the
    SD clipped >= 0) and the mask (linear + 0.5 threshold) to the isotropic output grid;
    ``voxel_size=None`` passes the files through unchanged. Carried volumes (b0s) are not
    resampled here: :class:`RebuildDWI` resamples them one at a time while it streams the output
    (no 4D b0 array on the fine grid)."""

    input_spec = _ResampleInputSpec
    output_spec = _ResampleOutputSpec

    def _run_step(self, runtime):
        voxel_size = self.inputs.voxel_size

        def resampled(in_file, kind="image", clip_min=None, sub=""):
            if voxel_size is None:
                return in_file
            return steps.resample_step(in_file, voxel_size, Path(runtime.cwd) / sub, kind, clip_min)

        self._results["s0_file"] = resampled(self.inputs.s0_file, clip_min=0.0)
        self._results["mask_file"] = resampled(self.inputs.mask_file, kind="mask")
        for name, clip_min in (("sh_files", None), ("scale_files", 0.0), ("std_files", 0.0)):
            files = list(getattr(self.inputs, name)) if isdefined(getattr(self.inputs, name)) else []
            self._results[name] = [resampled(f, clip_min=clip_min, sub=name) for f in files]
        return runtime


class _ScaleSHInputSpec(StepInputSpec):
    sh_files = traits.List(File(exists=True), mandatory=True, desc="SH coefficients per fitted shell")
    scale_files = traits.List(File(exists=True), mandatory=True, desc="scale maps per fitted shell")
    std_files = traits.List(File(exists=True), desc="ldm SD maps per fitted shell (optional)")
    mask_file = File(exists=True, mandatory=True)
    sh_order_max = traits.Int(4, usedefault=True)
    skull_strip = traits.Bool(False, usedefault=True, desc="RISH maps zero outside the mask")


class _ScaleSHOutputSpec(TraitedSpec):
    sh_files = traits.List(File(), desc="not produced since the rebuild scales its own coefficients; "
                           "kept so that results cached in a work folder by earlier versions still load")
    scale_file = File(exists=True, desc="scale maps, 1 outside the mask, 3 volumes per shell")
    rish_source_file = File(exists=True, desc="source RISH on the output grid, every voxel, 3 volumes per shell")
    rish_predicted_file = File(exists=True, desc="predicted RISH on the output grid, every voxel, 3 volumes per shell")
    std_file = File(desc="ldm SD maps, 3 volumes per shell (given std_files only)")
    shell_map_files = traits.List(File(exists=True), desc="the uncompressed per-shell maps stacked into the "
                                  "three maps above, kept (and recorded beside the work folder) for the report")


class ScaleSH(StepInterface):
    """The RISH maps of C_lm and of C_hat_lm = lambda_l C_lm (Eq. 3; lambda = 1 outside the mask)
    and the scale maps, shell by shell, as derivatives (the rebuild scales its own coefficients)."""

    input_spec = _ScaleSHInputSpec
    output_spec = _ScaleSHOutputSpec

    def _run_step(self, runtime):
        std_files = list(self.inputs.std_files) if isdefined(self.inputs.std_files) else None
        self._results.update(steps.scale_sh_step(list(self.inputs.sh_files), list(self.inputs.scale_files),
                                                 self.inputs.mask_file, self.inputs.sh_order_max, runtime.cwd,
                                                 skull_strip=bool(self.inputs.skull_strip), std_files=std_files,
                                                 map_record=Path(runtime.cwd).parent / steps.MAP_COPIES))
        return runtime


class _RebuildInputSpec(StepInputSpec):
    s0_file = File(exists=True, mandatory=True, desc="S0 on the output grid")
    dwi_file = File(exists=True, mandatory=True, desc="volumes read (LoadDWI), on the input grid")
    mean_b0_file = File(exists=True, mandatory=True, desc="mean b0, on the input grid")
    sh_files = traits.List(File(exists=True), mandatory=True, desc="SH per fitted shell, output grid")
    scale_files = traits.List(File(exists=True), desc="scale maps per fitted shell, output grid (Eq. 3 "
                              "applied here; none: the SH as given)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the output grid")
    plan_file = File(exists=True, mandatory=True)
    bval_file = File(exists=True, mandatory=True, desc="b-values of the output volumes")
    bvec_file = File(exists=True, mandatory=True, desc="bvecs of the output volumes")
    sh_order_max = traits.Int(4, usedefault=True)
    integer_output = traits.Bool(False, usedefault=True, desc="write int16 + scl_slope (integer source)")
    skull_strip = traits.Bool(False, usedefault=True, desc="every volume zero outside the mask")


class _RebuildOutputSpec(TraitedSpec):
    dwi_file = File(exists=True)
    bval_file = File(exists=True)
    bvec_file = File(exists=True)
    mask_file = File(exists=True)


class RebuildDWI(StepInterface):
    """Write the 7T-like DWI on the output table from scaled SH in every voxel, carried volumes
    (b0s) put back (resampled to the output grid when needed), clipped >= 0; zero outside the
    mask only with ``skull_strip``; streamed to disk volume by volume."""

    input_spec = _RebuildInputSpec
    output_spec = _RebuildOutputSpec

    def _run_step(self, runtime):
        inputs = self.inputs
        self._results.update(steps.rebuild_step(inputs.s0_file, inputs.dwi_file, inputs.mean_b0_file,
                                                list(inputs.sh_files), inputs.mask_file, inputs.plan_file,
                                                inputs.bval_file, inputs.bvec_file, inputs.sh_order_max,
                                                runtime.cwd, integer_output=bool(inputs.integer_output),
                                                skull_strip=bool(inputs.skull_strip),
                                                # beside the node folder: nipype removes files in it
                                                # that are not outputs used downstream
                                                report_samples=Path(runtime.cwd).parent / steps.REPORT_SAMPLES,
                                                scale_files=list(inputs.scale_files)
                                                if isdefined(inputs.scale_files) else None))
        return runtime

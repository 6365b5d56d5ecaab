"""nipype interfaces of the participant-level DWI steps (thin wrappers of :mod:`.steps`)."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network at run time

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from . import steps


def _optional(value):
    return value if isdefined(value) and value not in ("", None) else None


class _SelectShellInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="source 4D DWI")
    bval_file = traits.Either(None, traits.Str, default=None, usedefault=True, desc=".bval (None: missing)")
    bvec_file = traits.Either(None, traits.Str, default=None, usedefault=True, desc=".bvec (None: missing)")
    shell = traits.Float(1000.0, usedefault=True, desc="b-value of the shell to keep (s/mm²)")
    shell_tolerance = traits.Float(100.0, usedefault=True, desc="tolerance around shell (s/mm²)")
    sh_order_max = traits.Int(4, usedefault=True, desc="SH order the shell must support")


class _SelectShellOutputSpec(TraitedSpec):
    bval_file = File(exists=True, desc="b-values of the kept volumes (b0s then shell)")
    bvec_file = File(exists=True, desc="FSL bvecs of the kept volumes")
    index = traits.List(traits.Int, desc="input volume indices, in output order")
    n_b0 = traits.Int(desc="number of b0 volumes kept")
    shell_bval = traits.Float(desc="mean b-value of the kept shell (s/mm²)")
    warnings = traits.List(traits.Str, desc="dropped volumes, shell tolerance used (one line each)")


class SelectShell(SimpleInterface):
    """Check the gradient table against the image and keep the b0s and one shell."""

    input_spec = _SelectShellInputSpec
    output_spec = _SelectShellOutputSpec

    def _run_interface(self, runtime):
        self._results.update(steps.select_shell_step(
            self.inputs.dwi_file, _optional(self.inputs.bval_file), _optional(self.inputs.bvec_file),
            self.inputs.shell, self.inputs.shell_tolerance, self.inputs.sh_order_max, runtime.cwd))
        return runtime


class _LoadDWIInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="source 4D DWI")
    index = traits.List(traits.Int, mandatory=True, desc="volumes to keep, in output order")
    n_b0 = traits.Int(mandatory=True, desc="the first n_b0 kept volumes are b0s")
    prior_warnings = traits.List(traits.Str, desc="warnings of the earlier steps (passed on first)")


class _LoadDWIOutputSpec(TraitedSpec):
    dwi_file = File(exists=True, desc="kept volumes, float32, NaN/Inf set to 0")
    mean_b0_file = File(exists=True, desc="mean b0 (X, Y, Z)")
    mean_dwi_file = File(exists=True, desc="mean of the shell's volumes (X, Y, Z)")
    bad_voxels_file = File(exists=True, desc="1 where a value was NaN/Inf")
    n_bad_voxels = traits.Int(desc="number of voxels with NaN/Inf")
    warnings = traits.List(traits.Str, desc="prior_warnings, then NaN/Inf voxels masked out (one line each)")
    integer_input = traits.Bool(desc="the source DWI is stored as integers")


class LoadDWI(SimpleInterface):
    """Read the kept volumes, sanitise NaN/Inf (masked later, with a warning); the run's warnings
    so far (``prior_warnings``) are passed on with its own."""

    input_spec = _LoadDWIInputSpec
    output_spec = _LoadDWIOutputSpec

    def _run_interface(self, runtime):
        self._results.update(steps.load_dwi_step(self.inputs.dwi_file, self.inputs.index, self.inputs.n_b0, runtime.cwd))
        prior = list(self.inputs.prior_warnings) if isdefined(self.inputs.prior_warnings) else []
        self._results["warnings"] = prior + list(self._results.get("warnings", []))
        return runtime


class _BrainMaskInputSpec(BaseInterfaceInputSpec):
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


class BrainMask(SimpleInterface):
    """The given mask (resampled onto the DWI grid when needed) or the automatic mask of the mean
    b0 (:mod:`bids_dmri_ldm.core.mask`); NaN/Inf voxels removed. The run's warnings so far
    (``prior_warnings``) are passed on with its own."""

    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _run_interface(self, runtime):
        self._results.update(steps.brain_mask_step(self.inputs.mean_b0_file, self.inputs.bad_voxels_file,
                                                   runtime.cwd, _optional(self.inputs.in_mask),
                                                   _optional(self.inputs.mean_dwi_file)))
        prior = list(self.inputs.prior_warnings) if isdefined(self.inputs.prior_warnings) else []
        self._results["warnings"] = prior + list(self._results.get("warnings", []))
        return runtime


class _FitRISHInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True)
    bval_file = File(exists=True, mandatory=True)
    bvec_file = File(exists=True, mandatory=True)
    sh_order_max = traits.Int(4, usedefault=True)


class _FitRISHOutputSpec(TraitedSpec):
    s0_file = File(exists=True, desc="S0 = mean b0, floored (X, Y, Z), every voxel")
    b0_file = File(exists=True, desc="b0 volumes (X, Y, Z, n_b0)")
    sh_file = File(exists=True, desc="SH coefficients of S/S0 (X, Y, Z, K)")
    rish_file = File(exists=True, desc="RISH L0, L2, L4 (X, Y, Z, 3)")


class FitRISH(SimpleInterface):
    """Normalise to S/S0, least-squares SH fit, RISH features (Eq. 1), in every voxel."""

    input_spec = _FitRISHInputSpec
    output_spec = _FitRISHOutputSpec

    def _run_interface(self, runtime):
        self._results.update(steps.fit_rish_step(self.inputs.dwi_file, self.inputs.bval_file, self.inputs.bvec_file,
                                                 None, self.inputs.sh_order_max, runtime.cwd))
        return runtime


class _PredictScaleMapsInputSpec(BaseInterfaceInputSpec):
    rish_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True)
    method = traits.Str(mandatory=True, desc="registered method name (bids_dmri_ldm.methods.Method)")
    model_dir = traits.Either(None, traits.Str, default=None, usedefault=True)
    options = traits.Dict(desc="method options (device, seed, ...)")


class _PredictScaleMapsOutputSpec(TraitedSpec):
    scale_file = File(exists=True, desc="scale maps lambda (X, Y, Z, 3)")
    provenance = traits.Dict(desc="method provenance for the sidecars")
    std_file = File(desc="per-voxel SD of the predicted 7T RISH (X, Y, Z, 3); ldm with num_samples > 1 only")


class PredictScaleMaps(SimpleInterface):
    """Scale maps lambda_l (Eq. 2) from the chosen translation method."""

    input_spec = _PredictScaleMapsInputSpec
    output_spec = _PredictScaleMapsOutputSpec

    def _run_interface(self, runtime):
        options = self.inputs.options if isdefined(self.inputs.options) else {}
        self._results.update(steps.predict_scale_step(self.inputs.rish_file, self.inputs.mask_file, self.inputs.method,
                                                      _optional(self.inputs.model_dir), options, runtime.cwd))
        return runtime


class _ResampleInputSpec(BaseInterfaceInputSpec):
    s0_file = File(exists=True, mandatory=True, desc="S0 (X, Y, Z)")
    sh_file = File(exists=True, mandatory=True, desc="SH coefficients (X, Y, Z, K)")
    scale_file = File(exists=True, mandatory=True, desc="scale maps (X, Y, Z, 3)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask (X, Y, Z)")
    voxel_size = traits.Either(None, traits.Float, default=None, usedefault=True, desc="mm; None keeps the grid")


class _ResampleOutputSpec(TraitedSpec):
    s0_file = File(exists=True)
    sh_file = File(exists=True)
    scale_file = File(exists=True)
    mask_file = File(exists=True)


class ResampleToGrid(SimpleInterface):
    """Resample S0, SH and scale maps (cubic B-spline; S0 and lambda clipped >= 0) and the mask
    (linear + 0.5 threshold) to the isotropic output grid; ``voxel_size=None`` passes the files
    through unchanged. The b0 volumes are not resampled here: :class:`RebuildDWI` resamples them
    one at a time while it streams the output (no 4D b0 array on the fine grid)."""

    input_spec = _ResampleInputSpec
    output_spec = _ResampleOutputSpec

    def _run_interface(self, runtime):
        voxel_size = self.inputs.voxel_size
        for name, kind, clip_min in (("s0_file", "image", 0.0), ("sh_file", "image", None),
                                     ("scale_file", "image", 0.0), ("mask_file", "mask", None)):
            in_file = getattr(self.inputs, name)
            self._results[name] = in_file if voxel_size is None else steps.resample_step(
                in_file, voxel_size, runtime.cwd, kind, clip_min)
        return runtime


class _ResampleImageInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image (X, Y, Z[, N])")
    voxel_size = traits.Either(None, traits.Float, default=None, usedefault=True, desc="mm; None keeps the grid")
    clip_min = traits.Either(None, traits.Float, default=None, usedefault=True, desc="lower clip after resampling")


class _ResampleImageOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class ResampleImage(SimpleInterface):
    """One image to the isotropic output grid (cubic B-spline), as :class:`ResampleToGrid` does."""

    input_spec = _ResampleImageInputSpec
    output_spec = _ResampleImageOutputSpec

    def _run_interface(self, runtime):
        voxel_size = self.inputs.voxel_size
        self._results["out_file"] = self.inputs.in_file if voxel_size is None else steps.resample_step(
            self.inputs.in_file, voxel_size, runtime.cwd, "image", self.inputs.clip_min)
        return runtime


class _ScaleSHInputSpec(BaseInterfaceInputSpec):
    sh_file = File(exists=True, mandatory=True)
    scale_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True)
    sh_order_max = traits.Int(4, usedefault=True)
    skull_strip = traits.Bool(False, usedefault=True, desc="RISH maps zero outside the mask")


class _ScaleSHOutputSpec(TraitedSpec):
    sh_file = File(exists=True, desc="scaled SH coefficients (Eq. 3)")
    scale_file = File(exists=True, desc="scale maps, 1 outside the mask")
    rish_source_file = File(exists=True, desc="source RISH on the output grid, every voxel")
    rish_predicted_file = File(exists=True, desc="predicted RISH on the output grid, every voxel")


class ScaleSH(SimpleInterface):
    """C_hat_lm = lambda_l C_lm (Eq. 3; lambda = 1 outside the mask) and the RISH maps."""

    input_spec = _ScaleSHInputSpec
    output_spec = _ScaleSHOutputSpec

    def _run_interface(self, runtime):
        self._results.update(steps.scale_sh_step(self.inputs.sh_file, self.inputs.scale_file, self.inputs.mask_file,
                                                 self.inputs.sh_order_max, runtime.cwd,
                                                 skull_strip=bool(self.inputs.skull_strip)))
        return runtime


class _RebuildInputSpec(BaseInterfaceInputSpec):
    s0_file = File(exists=True, mandatory=True, desc="S0 on the output grid")
    b0_file = File(exists=True, mandatory=True, desc="b0 volumes, on the input or the output grid")
    sh_file = File(exists=True, mandatory=True, desc="scaled SH coefficients on the output grid")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the output grid")
    bval_file = File(exists=True, mandatory=True)
    bvec_file = File(exists=True, mandatory=True)
    sh_order_max = traits.Int(4, usedefault=True)
    integer_output = traits.Bool(False, usedefault=True, desc="write int16 + scl_slope (integer source)")
    skull_strip = traits.Bool(False, usedefault=True, desc="every volume zero outside the mask")


class _RebuildOutputSpec(TraitedSpec):
    dwi_file = File(exists=True)
    bval_file = File(exists=True)
    bvec_file = File(exists=True)
    mask_file = File(exists=True)


class RebuildDWI(SimpleInterface):
    """Rebuild the 7T-like DWI from scaled SH in every voxel, b0 volumes put back (resampled to the
    output grid when needed), clipped >= 0; zero outside the mask only with ``skull_strip``;
    streamed to disk volume by volume."""

    input_spec = _RebuildInputSpec
    output_spec = _RebuildOutputSpec

    def _run_interface(self, runtime):
        self._results.update(steps.rebuild_step(self.inputs.s0_file, self.inputs.b0_file, self.inputs.sh_file,
                                                self.inputs.mask_file, self.inputs.bval_file, self.inputs.bvec_file,
                                                self.inputs.sh_order_max, runtime.cwd,
                                                integer_output=bool(self.inputs.integer_output),
                                                skull_strip=bool(self.inputs.skull_strip),
                                                # beside the node folder: nipype removes files in it
                                                # that are not outputs used downstream
                                                report_samples=Path(runtime.cwd).parent / steps.REPORT_SAMPLES))
        return runtime

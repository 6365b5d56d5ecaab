"""Plain functions behind the participant-level interfaces (files in, files out; no nipype).

Each ``*_step`` function reads its inputs from disk, calls the signal core / the method registry,
and writes its results into ``out_dir`` (NIfTI float32, mm/s units, the input's affine or the
output grid's). The nipype interfaces in :mod:`.dwi` and :mod:`.bids` are thin wrappers around
them, and the group level calls them directly. Intermediate images are uncompressed ``.nii``
(fast in the work directory); images that become derivatives are ``.nii.gz``.

What happens to each volume is decided once per run (:func:`select_shells_step`, a
:class:`~bids_dmri_ldm.core.shells.VolumePlan` written as JSON): the later steps read the plan.
Shells are processed one at a time (SH fit, scale maps, Eq. 3), in ascending b; their RISH and
scale maps are stacked in that order in the derivatives. The output DWI follows the output table
(the input's, volume for volume, or ``--output-gradients``).

The numerics live in :mod:`bids_dmri_ldm.core` (SH fit, resampling, Eq. 3 and the rebuild) and
the image streaming and atomic writes in :mod:`bids_dmri_ldm.io`; each step here reads its
inputs, calls them, and writes its outputs. One module per stage: :mod:`.inputs` (checks, plan,
reading), :mod:`.mask`, :mod:`.fit` (SH/RISH, scale maps), :mod:`.resample` (output grid, Eq. 3),
:mod:`.rebuild` (the 7T-like DWI).
"""
from __future__ import annotations

from ...errors import InputDataError
from .fit import SHELL_PROVENANCE_KEYS, fit_rish_step, predict_scale_step
from .inputs import (
    SOURCE_COPY,
    InputSummary,
    ShellOptions,
    check_run_inputs,
    check_voxel_type,
    clean_bvals,
    iter_stored_volumes,
    iter_volumes,
    load_dwi_step,
    read_plan,
    select_shells_step,
)
from .mask import brain_mask_step, user_mask_on_grid
from .rebuild import REPORT_SAMPLES, ReportSamples, rebuild_step
from .resample import (
    MAP_COPIES,
    resample_step,
    scale_sh_step,
    stack_channels,
    write_map_copies_record,
)

__all__ = [
    "MAP_COPIES",
    "REPORT_SAMPLES",
    "SHELL_PROVENANCE_KEYS",
    "SOURCE_COPY",
    "InputDataError",
    "InputSummary",
    "ReportSamples",
    "ShellOptions",
    "brain_mask_step",
    "check_run_inputs",
    "check_voxel_type",
    "clean_bvals",
    "fit_rish_step",
    "iter_stored_volumes",
    "iter_volumes",
    "load_dwi_step",
    "predict_scale_step",
    "read_plan",
    "rebuild_step",
    "resample_step",
    "scale_sh_step",
    "select_shells_step",
    "stack_channels",
    "user_mask_on_grid",
    "write_map_copies_record",
]

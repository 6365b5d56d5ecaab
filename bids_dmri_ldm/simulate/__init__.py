"""Physics-based simulator of paired HCP-like 3T/7T diffusion MRI, written as a BIDS dataset.

Run ``python -m bids_dmri_ldm.simulate OUT_DIR --subjects N [--only-3t K] [--seed S]
[--voxel-scale X] [--physics default|shifted]``; see ``docs/simulator.md``. Modules:
:mod:`.acquisition` (protocols, gradient tables, grids), :mod:`.anatomy` (MNI152 tissue, subject
deformation, partial volume), :mod:`.fibres` (bundles), :mod:`.signal` (compartment model, T2,
diffusion time), :mod:`.fields` (gradient non-linearity, B1 transmit/receive/g-factor),
:mod:`.physics` (presets), :mod:`bids_dmri_ldm.bidsio.heldout` (the held-out datasets' marker), :mod:`.noise` (Rician noise), :mod:`.scan` (one scan), :mod:`.writer`
(BIDS files), :mod:`.run`, :mod:`.cli`.

:func:`is_shifted_dataset` tells whether a dataset was made with the held-out-only ``shifted``
physics (never train on one).
"""
from ..bidsio.heldout import is_shifted_dataset  # numpy-free: see heldout.py

__all__ = ["is_shifted_dataset"]

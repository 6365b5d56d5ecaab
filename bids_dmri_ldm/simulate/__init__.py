"""Physics-based simulator of paired HCP-like 3T/7T diffusion MRI, written as a BIDS dataset.

Run ``python -m bids_dmri_ldm.simulate OUT_DIR --subjects N [--only-3t K] [--seed S]
[--voxel-scale X]``; see ``docs/simulator.md``. Modules: :mod:`.acquisition` (protocols,
gradient tables, grids), :mod:`.anatomy` (MNI152 tissue, subject deformation, partial volume),
:mod:`.fibres` (bundles), :mod:`.signal` (compartment model), :mod:`.noise` (Rician noise,
receive field), :mod:`.scan` (one scan), :mod:`.writer` (BIDS files), :mod:`.run`, :mod:`.cli`.
"""

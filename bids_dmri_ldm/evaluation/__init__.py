"""Evaluation of 7T-like predictions (paper Table 1: NMSE and SSIM of RISH L0, L2, L4 and FA).

* :mod:`.scoring` — pure functions on arrays: maps of a DWI, resampling into the reference grid,
  NMSE / SSIM inside a mask, mean ± sd over participants.
* :mod:`.discovery` — finding predictions (derivative dataset, globbing) and 7T truth (raw
  dataset, pybids; simulator ground truth in ``derivatives/simulation``).
* :mod:`.pipeline` — loading one participant's files and scoring them with :mod:`.scoring`.
* :mod:`.report` — TSV and Markdown tables.

Nothing is imported here: the command line stays quick to start (torch and MONAI load only
when scoring begins).

The command line is :mod:`.cli` (``python -m bids_dmri_ldm.evaluate``, through the thin
:mod:`bids_dmri_ldm.evaluate`).
"""

#!/usr/bin/env python
"""Export the group level's RISH training features of BIDS datasets into one ``.npz``.

    python tools/export_rish_features.py OUT.npz BIDS_DIR [BIDS_DIR ...] -w WORK_DIR

Each run goes through exactly the group level's feature step
(:func:`bids_dmri_ldm.workflows.group_features.collect_ldm_features`: b = 1000 shell, SH fit,
RISH orders 0/2/4, brain mask; cached in ``WORK_DIR/ldm_rish_cache``), so the file holds
what ``bids-dmri-ldm BIDS OUT group --method ldm`` would train on.  With several datasets
the participant keys are prefixed ``d<k>-`` (k = position on the command line) so that
``sub-01`` of two simulations stay apart.

A dataset simulated for held-out evaluation only (``--physics shifted``) is refused (exit 65),
as the group level refuses it.

The file lets training run where only PyTorch and MONAI are installed
(``tools/train_from_features.py``, e.g. on a GPU node without the BIDS stack).
Layout: arrays ``<role>/<participant>/rish`` (X, Y, Z, 3) float32,
``<role>/<participant>/mask`` (X, Y, Z) bool and ``<role>/<participant>/affine`` (4, 4) float64
(voxel -> scanner mm: training pairs 3T and 7T through it), role ``3T`` or ``7T``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def export_features(bids_dirs: list[Path], work_dir: Path) -> dict[str, np.ndarray]:
    from bids_dmri_ldm.bidsio.layout import collect_dwi_runs, load_layout
    from bids_dmri_ldm.config import RunConfig
    from bids_dmri_ldm.workflows.group_features import collect_ldm_features

    arrays: dict[str, np.ndarray] = {}
    for k, bids_dir in enumerate(bids_dirs):
        prefix = f"d{k}-" if len(bids_dirs) > 1 else ""
        config = RunConfig(bids_dir=bids_dir, output_dir=work_dir / "unused", analysis_level="group",
                           work_dir=work_dir)  # the cache is keyed by file path
        runs = collect_dwi_runs(load_layout(bids_dir))
        for role, features in zip(("3T", "7T"), collect_ldm_features(config, runs)):
            for label, (rish, mask, affine) in features.items():
                arrays[f"{role}/{prefix}{label}/rish"] = rish.astype(np.float32)
                arrays[f"{role}/{prefix}{label}/mask"] = mask.astype(bool)
                arrays[f"{role}/{prefix}{label}/affine"] = np.asarray(affine, np.float64)
    return arrays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output .npz")
    parser.add_argument("bids_dirs", type=Path, nargs="+", help="raw BIDS datasets with 3T/7T DWI")
    parser.add_argument("-w", "--work-dir", type=Path, required=True, help="RISH cache folder")
    args = parser.parse_args(argv)
    from bids_dmri_ldm.bidsio.heldout import training_refusal
    from bids_dmri_ldm.errors import EX_DATAERR

    for bids_dir in args.bids_dirs:
        refusal = training_refusal(bids_dir)
        if refusal:
            print(f"{parser.prog}: error: {refusal}", file=sys.stderr)
            return EX_DATAERR
    arrays = export_features([p.resolve() for p in args.bids_dirs], args.work_dir.resolve())
    tmp = args.out.with_name(f".{args.out.name}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, args.out)
    n3 = sum(key.startswith("3T/") and key.endswith("/rish") for key in arrays)
    n7 = sum(key.startswith("7T/") and key.endswith("/rish") for key in arrays)
    print(f"{args.out}: {n3} 3T and {n7} 7T participants")
    return 0


if __name__ == "__main__":
    sys.exit(main())

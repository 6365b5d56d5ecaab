#!/usr/bin/env python3
"""Benchmark: the automatic brain mask (``core.mask.brain_mask``) against dipy's ``median_otsu``,
time and coverage of the simulator's truth brain.

Subject: the project's simulator at ``--voxel-scale 1`` (HCP grids: 3T 145 x 174 x 145 at
1.25 mm, 7T 173 x 207 x 173 at 1.05 mm; ~1.5 min to simulate on 2 cores, reused with
``--keep``). For each scan the float32 mean b0 (and the mean b=1000 image, which the pipeline
passes too) is computed once; then each mask is timed ``--repeats`` times in this process
(median reported; ``median_otsu`` with the radius 4 / 4 passes the project used, once unless
``--otsu-repeats``). Printed: seconds, coverage of the truth brain (fraction of its voxels inside
the mask) and the fraction of the mask outside it, the machine and its load. Not a timed test.

Usage: python benchmarks/bench_mask.py [--voxel-scale 1] [--repeats 5] [--otsu-repeats 1]
       [--skip-otsu] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def simulated(root: Path, voxel_scale: float) -> Path:
    bids = root / f"sim_scale{voxel_scale:g}"
    if not (bids / "dataset_description.json").exists():
        subprocess.run([sys.executable, "-m", "bids_dmri_ldm.simulate", str(bids), "--subjects", "1",
                        "--voxel-scale", f"{voxel_scale:g}", "--seed", "7"], check=True, cwd=ROOT)
    return bids


def load_scan(bids: Path, session: str):
    import nibabel as nib

    folder = bids / "sub-01" / f"ses-{session}" / "dwi"
    img = nib.load(folder / f"sub-01_ses-{session}_dwi.nii.gz")
    bvals = np.loadtxt(folder / f"sub-01_ses-{session}_dwi.bval")
    data = np.asanyarray(img.dataobj)
    b0 = data[..., bvals <= 50].astype(np.float32).mean(axis=-1)
    dw = data[..., np.abs(bvals - 1000) <= 100].astype(np.float32).mean(axis=-1)
    truth_file = bids / "derivatives" / "simulation" / "sub-01" / f"ses-{session}" / "dwi" / \
        f"sub-01_ses-{session}_desc-brain_mask.nii.gz"
    truth = np.asanyarray(nib.load(truth_file).dataobj) > 0
    return b0, dw, truth, img.affine


def timed(function, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return result, times


def scores(mask: np.ndarray, truth: np.ndarray) -> dict:
    return {"coverage": float((mask & truth).sum() / truth.sum()),
            "outside_truth": float((mask & ~truth).sum() / max(1, mask.sum())),
            "mask_over_truth_volume": float(mask.sum() / truth.sum())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxel-scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--otsu-repeats", type=int, default=1)
    parser.add_argument("--skip-otsu", action="store_true")
    parser.add_argument("--keep", type=Path, help="folder to keep (and reuse) the simulated subject in")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from bids_dmri_ldm.core.mask import compute_brain_mask

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_mask_"))
    root.mkdir(parents=True, exist_ok=True)
    bids = simulated(root, args.voxel_scale)
    report = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "voxel_scale": args.voxel_scale, "scans": {}}
    for session in ("3T", "7T"):
        b0, dw, truth, affine = load_scan(bids, session)
        row = {"shape": list(b0.shape)}
        result, times = timed(lambda: compute_brain_mask(b0, affine, dw), args.repeats)
        row["brain_mask"] = {"median_s": statistics.median(times), "times_s": times,
                             "background": result.background, **scores(result.mask, truth)}
        result, times = timed(lambda: compute_brain_mask(b0, affine), args.repeats)
        row["brain_mask_b0_only"] = {"median_s": statistics.median(times), **scores(result.mask, truth)}
        if not args.skip_otsu:
            from dipy.segment.mask import median_otsu

            (_, old), times = timed(lambda: median_otsu(b0, median_radius=4, numpass=4), args.otsu_repeats)
            row["median_otsu"] = {"median_s": statistics.median(times), "times_s": times, **scores(old, truth)}
        report["scans"][session] = row
        print(f"{session} {b0.shape}: " + "; ".join(
            f"{name} {v['median_s']:.2f} s, coverage {v['coverage']:.4f}, outside truth {v['outside_truth']:.3f}"
            for name, v in row.items() if isinstance(v, dict)), flush=True)
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: the participant level at the default output grid (1.05 mm), CPU time and peak RSS.

Two subjects:

- ``demo``: the demo subject (``python -m bids_dmri_ldm.simulate DIR --subjects 1 --voxel-scale 3
  --seed 2024``: 48 x 58 x 48 voxels of 3.75 mm, 18 b0 + 90 b=1000 + 180 b=2000/3000 volumes,
  int16); the output grid is 171 x 207 x 171 (6.1 M voxels) x 108 volumes.
- ``hcp``: a synthetic HCP-size 3T run (145 x 174 x 145 voxels of 1.25 mm, 18 b0 + 90
  directions at b=1000, int16, single-tensor signal in an ellipsoidal brain; the generator of
  ``bench_sh_fit.py``); the output grid is 173 x 207 x 173 (6.2 M voxels) x 108 volumes.
- ``hcp3``: the same run with HCP's three shells, 18 b0 + 3 x 90 directions at b = 1000, 2000,
  3000 interleaved as HCP acquires them (the shells of one tensor field); the output grid is
  173 x 207 x 173 x 288 volumes (every input volume).

Each run is ``run.py BIDS OUT participant --method rish-global`` (default ``--nprocs``, report
included) under ``/usr/bin/time -v`` in a fresh output and work dir; printed: wall time, user
and system CPU time, peak RSS (the largest process), the machine and its load. On a shared
machine compare CPU times, not wall times. This is not a timed test.

Usage: python benchmarks/bench_participant.py [--subject demo|hcp|hcp3|both] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_demo(root: Path) -> Path:
    bids = root / "demo_bids"
    if not (bids / "dataset_description.json").exists():
        subprocess.run([sys.executable, "-m", "bids_dmri_ldm.simulate", str(bids), "--subjects", "1",
                        "--voxel-scale", "3", "--seed", "2024"], check=True, cwd=ROOT)
    return bids


def make_hcp(root: Path) -> Path:
    """Write the synthetic HCP-size run as a one-subject BIDS dataset (int16 .nii.gz)."""
    import nibabel as nib
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_sh_fit import make_subject

    bids = root / "hcp_bids"
    dwi_dir = bids / "sub-01" / "dwi"
    stem = dwi_dir / "sub-01_dwi"
    if (bids / "dataset_description.json").exists():
        return bids
    dwi_dir.mkdir(parents=True, exist_ok=True)
    data, bvals, bvecs, _ = make_subject(1.0)
    affine = np.diag([-1.25, 1.25, 1.25, 1.0])
    affine[:3, 3] = [90.0, -126.0, -72.0]
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, f"{stem}.nii.gz")
    (dwi_dir / "sub-01_dwi.bval").write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    (dwi_dir / "sub-01_dwi.bvec").write_text(
        "\n".join(" ".join(f"{v:.6f}" for v in row) for row in np.asarray(bvecs).T) + "\n")
    (dwi_dir / "sub-01_dwi.json").write_text(json.dumps({"MagneticFieldStrength": 3.0}))
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "synthetic HCP-size", "BIDSVersion": "1.9.0"}))
    return bids


def make_hcp3(root: Path) -> Path:
    """The synthetic HCP-size run with three shells (b = 1000, 2000, 3000), b0s and shells
    interleaved; written volume by volume (int16 .nii.gz)."""
    import nibabel as nib
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    from bench_sh_fit import make_subject

    from bids_dmri_ldm.interfaces.steps import write_nifti_volumes

    bids = root / "hcp3_bids"
    dwi_dir = bids / "sub-01" / "dwi"
    if (bids / "dataset_description.json").exists():
        return bids
    dwi_dir.mkdir(parents=True, exist_ok=True)
    data, bvals, bvecs, _ = make_subject(1.0)  # 18 b0 (S0 = 1000) + 90 at b = 1000
    order = []  # (source volume, b-value): a b0 every 16 volumes, the shells interleaved
    for k in range(90):
        if k % 5 == 0 and len([o for o in order if o[1] == 0]) < 18:
            order.append((len([o for o in order if o[1] == 0]), 0.0))
        order += [(18 + k, b) for b in (1000.0, 2000.0, 3000.0)]
    while len([o for o in order if o[1] == 0]) < 18:
        order.append((len([o for o in order if o[1] == 0]), 0.0))

    def volumes():
        for source, b in order:
            volume = data[..., source].astype(np.float32)
            if b > 1000:  # exp(-b D) = (exp(-1000 D))^(b / 1000) for the same tensor
                volume = 1000.0 * np.power(volume / 1000.0, b / 1000.0)
            yield volume

    affine = np.diag([-1.25, 1.25, 1.25, 1.0])
    affine[:3, 3] = [90.0, -126.0, -72.0]
    write_nifti_volumes(dwi_dir / "sub-01_dwi.nii.gz", data.shape[:3], affine, len(order), volumes(),
                        dtype=np.int16, slope=1.0)
    out_bvals = np.array([b for _, b in order])
    out_bvecs = np.array([bvecs[source] for source, _ in order])
    (dwi_dir / "sub-01_dwi.bval").write_text(" ".join(f"{b:g}" for b in out_bvals) + "\n")
    (dwi_dir / "sub-01_dwi.bvec").write_text(
        "\n".join(" ".join(f"{v:.6f}" for v in row) for row in out_bvecs.T) + "\n")
    (dwi_dir / "sub-01_dwi.json").write_text(json.dumps({"MagneticFieldStrength": 3.0}))
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "synthetic HCP-size, 3 shells",
                                                               "BIDSVersion": "1.9.0"}))
    return bids


def run_participant(bids: Path, scratch: Path, extra: list[str]) -> dict:
    out, work = scratch / "out", scratch / "work"
    cmd = ["/usr/bin/time", "-v", sys.executable, str(ROOT / "run.py"), str(bids), str(out), "participant",
           "-w", str(work), "--skip-bids-validation", "--method", "rish-global", *extra]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    err = proc.stderr

    def field(name: str) -> str:
        match = re.search(rf"{re.escape(name)}: (.+)", err)
        return match.group(1).strip() if match else "?"

    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    parts = [float(p) for p in wall.split(":")] if wall != "?" else [float("nan")]
    wall_s = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    dwi = next(out.rglob("*_desc-7Tlike_dwi.nii.gz"), None)
    return {
        "exit": proc.returncode,
        "wall_s": round(wall_s, 1),
        "user_s": float(field("User time (seconds)")),
        "sys_s": float(field("System time (seconds)")),
        "peak_rss_gb": round(int(field("Maximum resident set size (kbytes)")) / 2**20, 2),
        "load_before": round(load, 2),
        "output": None if dwi is None else {"shape": _shape(dwi), "bytes": dwi.stat().st_size},
        "report": (out / "sub-01.html").exists(),
        "log_tail": "" if proc.returncode == 0 else err[-2000:],
    }


def _shape(path: Path):
    import nibabel as nib

    img = nib.load(path)
    return [list(img.shape), str(img.get_data_dtype())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subject", choices=("demo", "hcp", "hcp3", "both"), default="both")
    parser.add_argument("--keep", type=Path, help="folder for the datasets (reused) and outputs")
    parser.add_argument("extra", nargs="*", help="more arguments for run.py (after --)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_participant_"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    subjects = ("demo", "hcp") if args.subject == "both" else (args.subject,)
    for name in subjects:
        bids = {"demo": make_demo, "hcp": make_hcp, "hcp3": make_hcp3}[name](root)
        scratch = root / f"run_{name}_{int(time.time())}"
        result = run_participant(bids, scratch, args.extra)
        print(name, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: SH fit + RISH of an HCP-size 3T b=1000 shell, ours vs dipy ``sf_to_sh(smooth=0)``.

Synthetic subject: 145 x 174 x 145 voxels, 18 b0 + 90 directions at b=1000 (int16 on disk, as
scanners write), an ellipsoidal brain mask (~1/2 of the box), single-tensor signal.
Each method runs in its own subprocess so its peak RSS (ru_maxrss) is measured separately; the
int16 data (~0.8 GB at full size) is generated slab by slab and counted in both peaks.

Usage: python benchmarks/bench_sh_fit.py [--repeats 3] [--scale 1.0]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one


def make_subject(scale: float, seed: int = 0):
    from dipy.core.sphere import HemiSphere, disperse_charges

    shape = tuple(int(round(s * scale)) for s in (145, 174, 145))
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(90, 3))
    hemi, _ = disperse_charges(HemiSphere(xyz=xyz / np.linalg.norm(xyz, axis=1, keepdims=True)), 100)
    g = hemi.vertices
    bvals = np.r_[np.zeros(18), np.full(90, 1000.0)]
    axes = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    data = np.zeros(shape + (108,), np.int16)
    mask = np.zeros(shape, bool)
    for i, x in enumerate(axes[0]):  # slab by slab so generation stays light on memory
        grid = np.stack(np.meshgrid([x], axes[1], axes[2], indexing="ij"), -1)[0]
        mask[i] = np.sum(grid**2, -1) < 0.8
        # principal direction varies smoothly across the volume
        e1 = grid / (np.linalg.norm(grid, axis=-1, keepdims=True) + 1e-6)
        cos2 = (e1.reshape(-1, 3) @ g.T.astype(np.float32)) ** 2
        att = np.exp(-1000 * (0.3e-3 + 1.4e-3 * cos2)).reshape(grid.shape[:2] + (90,))
        data[i, ..., :18] = 1000
        data[i, ..., 18:] = (1000 * att).astype(np.int16)
        data[i][~mask[i]] = 0
    return data, bvals, np.vstack([np.zeros((18, 3)), g]), mask


def run_ours(scale: float) -> dict:
    from bids_dmri_ldm.core.sh import SHModel
    from bids_dmri_ldm.core.signal import fit_shell_rish

    data, bvals, bvecs, mask = make_subject(scale)
    t0 = time.perf_counter()
    model = SHModel(bvecs[18:], 4)
    _, coeffs, rish = fit_shell_rish(data, np.arange(18), np.arange(18, 108), mask, model.fit_matrix,
                                     model.l_values, n_threads=2)
    elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "rish_mean": rish[mask].mean(axis=0).tolist()}


def run_dipy(scale: float) -> dict:
    from dipy.core.sphere import Sphere
    from dipy.reconst.shm import sf_to_sh

    from bids_dmri_ldm.core.sh import rish_features, sh_basis

    data, bvals, bvecs, mask = make_subject(scale)
    t0 = time.perf_counter()
    s0 = np.maximum(data[..., :18].mean(-1), 1.0)
    att = np.clip(data[..., 18:] / s0[..., None], 0, 1) * mask[..., None]
    coeffs = sf_to_sh(att, Sphere(xyz=bvecs[18:]), sh_order_max=4, basis_type="descoteaux07", legacy=False, smooth=0.0)
    rish = rish_features(coeffs, sh_basis(bvecs[18:], 4)[2])
    elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "rish_mean": rish[mask].mean(axis=0).tolist()}


def child(which: str, scale: float) -> None:
    result = {"ours": run_ours, "dipy": run_dipy}[which](scale)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--child", choices=["ours", "dipy"])
    args = parser.parse_args()
    if args.child:
        child(args.child, args.scale)
        return
    results = {"ours": [], "dipy": []}
    for _ in range(args.repeats):
        for which in results:
            out = subprocess.run([sys.executable, __file__, "--child", which, "--scale", str(args.scale)], check=True, capture_output=True, text=True)
            results[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
    ours_t = statistics.median(r["seconds"] for r in results["ours"])
    dipy_t = statistics.median(r["seconds"] for r in results["dipy"])
    print(f"machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, python {platform.python_version()}")
    print(f"ours: median {ours_t:.2f} s, peak RSS {max(r['peak_rss_gb'] for r in results['ours']):.2f} GB")
    print(f"dipy sf_to_sh(smooth=0): median {dipy_t:.2f} s, peak RSS {max(r['peak_rss_gb'] for r in results['dipy']):.2f} GB")
    print(f"speed-up: {dipy_t / ours_t:.1f}x")
    rel = np.abs(np.array(results["ours"][0]["rish_mean"]) / np.array(results["dipy"][0]["rish_mean"]) - 1).max()
    print(f"max relative difference of mean RISH: {rel:.2e}")


if __name__ == "__main__":
    main()

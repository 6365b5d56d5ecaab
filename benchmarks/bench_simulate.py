"""Benchmark of the paired 3T/7T simulator: wall time, CPU time and peak memory of a pair.

Usage::

    python benchmarks/bench_simulate.py                 # --voxel-scale 4 pair (target < 10 s on 2 cores)
    python benchmarks/bench_simulate.py --full          # also the full-size pair (target < 5 min, < 8 GB)
    python benchmarks/bench_simulate.py --scales 4 3 1 --nprocs 2
    python benchmarks/bench_simulate.py --ratio-spread --ratio-scale 4 --noise-draws 8 [--physics shifted]
                                                        # how much the 7T/3T RISH ratio varies in space

Each case runs ``python -m bids_dmri_ldm.simulate OUT --subjects 1 --voxel-scale X --nprocs P``
in a fresh process. Peak memory is the largest total RSS of the whole process tree, sampled
every 0.5 s from /proc; CPU time is user + system of the tree (``resource.RUSAGE_CHILDREN``).
The machine's load average is printed with each result, because wall times on a shared machine
mean little without it. Not a test: numbers go into docs/simulator.md.

``--ratio-spread`` measures, for one simulated subject, the voxel-wise ratio lambda_l^2 =
RISH_l(7T) / RISH_l(3T) (b = 1000, S/S0, order-4 unregularised fit) in WM (fraction >= 0.9), GM and
CSF (>= 0.7) of the 3T grid: 5th/50th/95th percentiles and the SD of ln lambda^2 (0 would mean a
single global factor per order is exact). Two pairings: the 7T physics simulated on the 3T grid
("same grid": physics only) and the native grids with the 7T maps interpolated (trilinear) to the
3T voxel centres by world position. Two signals: the noiseless truth, and the mean RISH over
``--noise-draws`` noise realisations (the noise floor included; fewer draws leave some noise in
the ratio). ``--effects`` adds rows with one spatial effect at a time.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    """Child PIDs of ``pid`` (Linux ``/proc/PID/task/*/children``)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                out += [int(c) for c in handle.read().split()]
    except OSError:
        pass
    return out


def _tree_rss_bytes(root_pid: int) -> int:
    """Total resident memory of ``root_pid`` and all its descendants (Linux /proc)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/statm") as handle:
                total += int(handle.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        stack.extend(_children(pid))
    return total


def run_case(scale: float, nprocs: int, seed: int = 2024) -> dict:
    """Simulate one paired subject at ``scale``; returns timings and peak memory."""
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        out = Path(tmp) / "bids"
        cmd = [sys.executable, "-m", "bids_dmri_ldm.simulate", str(out), "--subjects", "1",
               "--voxel-scale", str(scale), "--seed", str(seed), "--nprocs", str(nprocs)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _tree_rss_bytes(proc.pid))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, err = proc.communicate()
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"simulator failed ({proc.returncode}): {err.strip()}")
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"scale": scale, "nprocs": nprocs, "wall_s": wall, "cpu_s": cpu, "peak_rss_gb": peak / 1e9,
            "output_gb": size / 1e9, "load_before": load_before, "load_after": os.getloadavg()[0]}


TISSUE_THRESHOLDS = {"WM": (0, 0.9), "GM": (1, 0.7), "CSF": (2, 0.7)}


def rish_of_dwi(dwi, bvals, bvecs, shell: float = 1000.0):
    """RISH L0/L2/L4 ``(X, Y, Z, 3)`` of S/S0 on one shell (mean b0, order 4, unregularised)."""
    import numpy as np

    from bids_dmri_ldm.core.sh import SHModel, rish_features

    dwi = np.asarray(dwi, np.float32)
    s0 = dwi[..., bvals <= 50].mean(axis=-1)
    selected = np.abs(bvals - shell) < 100
    attenuation = np.where(s0[..., None] > 0, dwi[..., selected] / np.maximum(s0[..., None], 1e-6), 0.0)
    model = SHModel(bvecs[selected], sh_order_max=4)
    return rish_features(attenuation.astype(np.float32) @ model.fit_matrix.T.astype(np.float32), model.l_values)


def to_grid(values, affine_from, affine_to, shape_to):
    """Trilinear interpolation of ``values (X, Y, Z, C)`` at the voxel centres of another grid."""
    import numpy as np
    from scipy import ndimage

    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape_to), indexing="ij"), -1).reshape(-1, 3)
    world = index @ affine_to[:3, :3].T + affine_to[:3, 3]
    source = (world - affine_from[:3, 3]) @ np.linalg.inv(affine_from[:3, :3]).T
    out = [ndimage.map_coordinates(values[..., c], source.T, order=1, mode="nearest") for c in range(values.shape[-1])]
    return np.stack(out, -1).reshape(tuple(shape_to) + (values.shape[-1],))


def spread_rows(rish_3t, rish_7t_on_3t, tissue_3t, halves=None) -> list[tuple]:
    """(tissue, order, voxels, p5, p50, p95, SD ln lambda^2, spatial SD) of the voxel-wise 7T/3T ratio.

    ``halves``: ``((3T, 7T) of the first half of the noise draws, (3T, 7T) of the second half)``.
    The difference of the two halves' ln ratios estimates the noise left in the mean
    (Var(ln A - ln B) / 4 for the mean of both halves), which is subtracted from the variance to give
    the spatial SD; without halves the spatial SD is the SD.
    """
    import numpy as np

    rows = []
    for name, (channel, threshold) in TISSUE_THRESHOLDS.items():
        mask = tissue_3t[..., channel] >= threshold
        for column, order in enumerate((0, 2, 4)):
            a, b = rish_3t[mask][:, column], rish_7t_on_3t[mask][:, column]
            valid = (a > 1e-12) & (b > 0)
            if halves is not None:
                parts = [(h3[mask][:, column], h7[mask][:, column]) for h3, h7 in halves]
                valid &= np.all([(p3 > 1e-12) & (p7 > 0) for p3, p7 in parts], axis=0)
            ratio = b[valid] / a[valid]
            if ratio.size < 10:
                continue
            p5, p50, p95 = np.percentile(ratio, [5, 50, 95])
            variance = float(np.var(np.log(ratio)))
            spatial = variance
            if halves is not None:
                (a1, b1), (a2, b2) = parts
                difference = np.log(b1[valid] / a1[valid]) - np.log(b2[valid] / a2[valid])
                spatial = max(variance - float(np.var(difference)) / 4.0, 0.0)
            rows.append((name, order, int(valid.sum()), p5, p50, p95, np.sqrt(variance), np.sqrt(spatial)))
    return rows


def print_rows(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}\n| tissue | order | voxels | p5 | median | p95 | p95/p5 | SD ln λ² | spatial SD |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for name, order, n, p5, p50, p95, sd, spatial in rows:
        print(f"| {name} | L{order} | {n} | {p5:.3f} | {p50:.3f} | {p95:.3f} | {p95 / p5:.2f} | {sd:.3f} | {spatial:.3f} |", flush=True)


def ratio_spread(scale: float, draws: int, physics: str, effects: bool, seed: int = 2024) -> None:
    """Print the spread of the voxel-wise 7T/3T RISH ratio of one simulated subject (see module doc)."""
    from dataclasses import replace

    from bids_dmri_ldm.simulate.anatomy import (
        lattice_spacing,
        random_subject,
        subject_tissue_lattice,
    )
    from bids_dmri_ldm.simulate.physics import PRESETS, build_scan_physics
    from bids_dmri_ldm.simulate.run import subject_seed
    from bids_dmri_ldm.simulate.scan import simulate_scan

    preset = PRESETS[physics]
    subject = random_subject(subject_seed(seed, 1))
    lattice = subject_tissue_lattice(subject, lattice_spacing(scale))
    configs = {"all effects (preset)": {}}
    if effects:
        off = {"gradient_drop": 0.0, "b1_strength": 0.0, "disorder_amplitude_um2": 0.0, "tract_variation": 0.0}
        configs.update({
            "none (uniform T2/TE weighting and partial volume only)": off,
            "gradient non-linearity only": {**off, "gradient_drop": None},
            "B1 (SNR) only": {**off, "b1_strength": None},
            "diffusion time only": {**off, "disorder_amplitude_um2": None},
            "tract-specific intra-axonal fractions only": {**off, "tract_variation": None},
        })
    for label, overrides in configs.items():
        kwargs = {k: v for k, v in overrides.items() if v is not None}
        scan_3t, scan_7t = (build_scan_physics(preset, session, **kwargs) for session in ("3T", "7T"))
        same_grid = replace(scan_7t, protocol=replace(scan_7t.protocol, voxel_mm=scan_3t.protocol.voxel_mm, shape=scan_3t.protocol.shape))
        pairings = {"same grid": same_grid} if effects and label != "all effects (preset)" else {"same grid": same_grid, "native grids": scan_7t}
        bvals_3t, g_3t = scan_3t.protocol.gradient_table()
        bvals_7t, g_7t = scan_7t.protocol.gradient_table()
        for pairing, seven in pairings.items():
            clean_3t = simulate_scan(subject, lattice, scan_3t, scale, noise_seed=0, noise=False)
            clean_7t = simulate_scan(subject, lattice, seven, scale, noise_seed=0, noise=False)
            grid = (clean_7t.affine, clean_3t.affine, clean_3t.rish.shape[:3])
            print_rows(f"{physics}, {label}, {pairing}, noiseless truth, --voxel-scale {scale:g}",
                       spread_rows(clean_3t.rish, to_grid(clean_7t.rish, *grid), clean_3t.tissue))
            if draws:
                noisy_3t = [rish_of_dwi(simulate_scan(subject, lattice, scan_3t, scale, noise_seed=1000 + k).dwi, bvals_3t, g_3t)
                            for k in range(draws)]
                noisy_7t = [to_grid(rish_of_dwi(simulate_scan(subject, lattice, seven, scale, noise_seed=2000 + k).dwi, bvals_7t, g_7t), *grid)
                            for k in range(draws)]
                half = draws // 2
                halves = [(sum(noisy_3t[:half]) / half, sum(noisy_7t[:half]) / half),
                          (sum(noisy_3t[half:]) / (draws - half), sum(noisy_7t[half:]) / (draws - half))] if draws >= 2 else None
                print_rows(f"{physics}, {label}, {pairing}, mean RISH over {draws} noise draws, --voxel-scale {scale:g}",
                           spread_rows(sum(noisy_3t) / draws, sum(noisy_7t) / draws, clean_3t.tissue, halves))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[4.0])
    parser.add_argument("--full", action="store_true", help="add the full-size pair (--voxel-scale 1)")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--ratio-spread", action="store_true", help="measure the spatial spread of the 7T/3T RISH ratio instead")
    parser.add_argument("--ratio-scale", type=float, default=4.0)
    parser.add_argument("--noise-draws", type=int, default=8)
    parser.add_argument("--physics", default="default")
    parser.add_argument("--effects", action="store_true", help="also one spatial effect at a time (same grid)")
    args = parser.parse_args()
    if args.ratio_spread:
        print(f"# {platform.node()}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
        ratio_spread(args.ratio_scale, args.noise_draws, args.physics, args.effects)
        return
    scales = list(args.scales) + ([1.0] if args.full and 1.0 not in args.scales else [])
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}, python {platform.python_version()}")
    print("scale  nprocs  wall_s   cpu_s  peak_rss_GB  output_GB  load(before/after)")
    for scale in scales:
        r = run_case(scale, args.nprocs)
        print(f"{r['scale']:5g}  {r['nprocs']:6d}  {r['wall_s']:6.1f}  {r['cpu_s']:6.1f}  {r['peak_rss_gb']:11.2f}  "
              f"{r['output_gb']:9.2f}  {r['load_before']:.1f}/{r['load_after']:.1f}", flush=True)


if __name__ == "__main__":
    main()

"""Benchmark of the paired 3T/7T simulator: wall time, CPU time and peak memory of a pair.

Usage::

    python benchmarks/bench_simulate.py                 # --voxel-scale 4 pair (target < 10 s on 2 cores)
    python benchmarks/bench_simulate.py --full          # also the full-size pair (target < 5 min, < 8 GB)
    python benchmarks/bench_simulate.py --scales 4 3 1 --nprocs 2

Each case runs ``python -m bids_dmri_ldm.simulate OUT --subjects 1 --voxel-scale X --nprocs P``
in a fresh process. Peak memory is the largest total RSS of the whole process tree, sampled
every 0.5 s from /proc; CPU time is user + system of the tree (``resource.RUSAGE_CHILDREN``).
The machine's load average is printed with each result, because wall times on a shared machine
mean little without it. Not a test: numbers go into docs/simulator.md.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[4.0])
    parser.add_argument("--full", action="store_true", help="add the full-size pair (--voxel-scale 1)")
    parser.add_argument("--nprocs", type=int, default=2)
    args = parser.parse_args()
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

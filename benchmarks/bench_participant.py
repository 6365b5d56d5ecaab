#!/usr/bin/env python3
"""Benchmark: the participant level at the default output grid (1.05 mm) against its I/O floor.

Subjects:

- ``hcp`` (default): a synthetic HCP-size 3T run (145 x 174 x 145 voxels of 1.25 mm, 18 b0 + 90
  directions at b=1000, int16 ``.nii.gz`` written by nibabel, single-tensor signal in an
  ellipsoidal brain; the generator of ``bench_sh_fit.py``); the output grid is 173 x 207 x 173
  (6.2 M voxels) x 108 volumes.
- ``demo``: the demo subject (``python -m bids_dmri_ldm.simulate DIR --subjects 1 --voxel-scale 3
  --seed 2024``: 48 x 58 x 48 voxels of 3.75 mm, 18 b0 + 90 b=1000 + 180 b=2000/3000 volumes,
  int16); every shell is translated, so the output grid is 171 x 207 x 171 x 288 volumes.
- ``hcp3``: the ``hcp`` run with HCP's three shells, 18 b0 + 3 x 90 directions at b = 1000,
  2000, 3000 interleaved as HCP acquires them (the shells of one tensor field; int16 ``.nii.gz``
  written through the I/O module); the output grid is 173 x 207 x 173 x 288 volumes (every
  input volume).

For each ``--method`` (default: rish-global and ldm with its shipped model), ``--repeats`` times,
``run.py BIDS OUT participant --skip-bids-validation`` runs in a fresh output and work folder
(default ``--nprocs``, report included). Printed per run:

- each step's wall time (nipype's node runtimes from the work folder; ``report``: from the log),
- the whole run's wall time, and the CPU time (user + system) and peak RSS of the whole process
  tree: ``/proc`` is sampled every 0.1 s, CPU is the sum over every process seen of its own last
  user + system time (nipype's workers are children of a forkserver, which ``wait4`` of the main
  process does not count), peak RSS the largest sum of the tree's resident sets at one sample,
- the load average before and after (the machine may be shared: compare CPU times),

and once per subject the **floor**: nibabel loading the input (``np.asanyarray(nib.load(p).dataobj)``)
plus nibabel saving the written 7T-like DWI as read back (``nib.save`` of the same int16 array and
header, i.e. stdlib zlib level 1), each in a fresh process; and the ratio of the run's wall time to
the floor's. Medians over the repeats. With ``--floor-each`` the floor is measured again after
every repeat and each run is also divided by the floor of its own repeat (``ratio_wall_each``,
median ``ratio_wall_paired``): on a shared VM whose speed drifts over minutes (the same code took
22.6-30.1 s within an hour on 2026-12-01) a run and a floor measured minutes apart disagree by more
than the differences being measured. Every run and floor starts after ``os.sync()`` (the writes of
what ran before are not flushed during it), and each repeat starts one place further along the
list of runs (method x checkout), so no run is always the one after the floor. This is not a
timed test.

Usage: python benchmarks/bench_participant.py [--subject hcp|hcp3|demo|both] [--method rish-global ldm]
       [--repeats 3] [--floor-each] [--keep DIR] [--json FILE] [--before OLD_CHECKOUT]
       [-- more run.py arguments]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def make_demo(root: Path) -> Path:
    bids = root / "demo_bids"
    if not (bids / "dataset_description.json").exists():
        subprocess.run([sys.executable, "-m", "bids_dmri_ldm.simulate", str(bids), "--subjects", "1",
                        "--voxel-scale", "3", "--seed", "2024"], check=True, cwd=ROOT)
    return bids


def make_hcp(root: Path) -> Path:
    """Write the synthetic HCP-size run as a one-subject BIDS dataset (int16 .nii.gz, nibabel)."""
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
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    from bench_sh_fit import make_subject

    from bids_dmri_ldm.io.nifti import write_nifti_volumes

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


# ---------------------------------------------------------------------------------------------
# process-tree accounting through /proc


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                kids.extend(int(k) for k in handle.read().split())
    except OSError:
        pass
    return kids


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(_children(p))
    return found


def _cpu_rss(pid: int) -> tuple[float, int] | None:
    """Own user + system seconds and resident bytes of one process (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # after the command name: state(0) ... utime(11) stime(12) ... rss(21)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[21]) * PAGE


def _role(pid: int, root: int) -> str:
    """What a process of the tree is: the command itself, the multiprocessing forkserver or
    resource tracker it started, a worker (forked from the server), or another child of the
    command (a short-lived shell)."""
    if pid == root:
        return "main"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "worker"
    if "resource_tracker" in cmdline:
        return "resource tracker"
    if _parent(pid) != root:
        return "worker"
    return "server" if "forkserver" in cmdline else "child"


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _settle() -> None:
    """Write every dirty page to disk before the next measurement starts (each run writes and
    removes ~5 GB at HCP size, the floor ~0.4 GB: their writeback would otherwise run during, and
    be charged to, whatever is measured next)."""
    os.sync()


def _cpu_by_role(per_process: list[list]) -> dict[str, float]:
    """CPU seconds of one run summed by process role (``run_monitored``'s ``cpu_s_by_process``)."""
    totals: dict[str, float] = {}
    for role, cpu in per_process:
        totals[role] = totals.get(role, 0.0) + cpu
    return totals


def run_monitored(cmd: list[str], cwd: Path, interval: float = 0.1) -> dict:
    """Run ``cmd``; wall time, CPU time and peak RSS of its whole process tree (and the CPU time of
    each of its processes, by role, in the order they appeared), and its stderr."""
    err_file, out_file = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=out_file, stderr=err_file)
    cpu_seen: dict[int, float] = {}
    roles: dict[int, str] = {}
    peak = 0
    while proc.poll() is None:
        total = 0
        for pid in _tree(proc.pid):
            sample = _cpu_rss(pid)
            if sample is not None:
                cpu_seen[pid] = max(cpu_seen.get(pid, 0.0), sample[0])
                if pid not in roles:  # read /proc once per process, not at every sample
                    roles[pid] = _role(pid, proc.pid)
                total += sample[1]
        peak = max(peak, total)
        time.sleep(interval)
    wall = time.perf_counter() - start
    err_file.seek(0)
    out_file.seek(0)
    return {"exit": proc.returncode, "wall_s": wall, "cpu_s": sum(cpu_seen.values()),
            "peak_rss_gb": peak / 2**30, "processes": len(cpu_seen),
            "cpu_s_by_process": [[roles[pid], round(cpu, 2)] for pid, cpu in cpu_seen.items()],
            "stdout": out_file.read().decode(errors="replace"), "stderr": err_file.read().decode(errors="replace")}


# ---------------------------------------------------------------------------------------------
# one participant run


def step_times(work: Path) -> dict[str, float]:
    """Wall seconds of each nipype node (from its result file), in start order."""
    sys.path.insert(0, str(ROOT))
    from nipype.utils.filemanip import loadpkl

    rows = []
    for result in work.rglob("result_*.pklz"):
        runtime = loadpkl(result).runtime
        rows.append((runtime.startTime, result.parent.name, float(runtime.duration)))
    times: dict[str, float] = {}
    for _, name, seconds in sorted(rows):
        if not name.startswith("ds_"):  # the derivative sinks: copies, summed below
            times[name] = round(seconds, 2)
    sinks = sum(seconds for _, name, seconds in rows if name.startswith("ds_"))
    times["write derivatives"] = round(sinks, 2)
    return times


def run_participant(bids: Path, scratch: Path, method: str, extra: list[str], repo: Path = ROOT) -> dict:
    out, work = scratch / "out", scratch / "work"
    cmd = [sys.executable, str(repo / "run.py"), str(bids), str(out), "participant", "-w", str(work),
           "--skip-bids-validation", "--method", method, *extra]
    load_before = os.getloadavg()
    result = run_monitored(cmd, repo)  # run from the checkout: its package shadows an installed one
    err = result.pop("stderr")
    result.pop("stdout")
    steps = step_times(work) if work.exists() else {}
    report = re.search(r"report \S+ written in ([0-9.]+) s", err)
    if report is None:
        logs = sorted((out / "logs").glob("*.log")) if (out / "logs").exists() else []
        text = logs[-1].read_text() if logs else ""
        report = re.search(r"report \S+ written in ([0-9.]+) s", text)
    steps["report"] = float(report.group(1)) if report else None
    dwi = next(out.rglob("*_desc-7Tlike_dwi.nii.gz"), None)
    result.update(
        method=method, steps=steps, load_before=[round(x, 2) for x in load_before],
        load_after=[round(x, 2) for x in os.getloadavg()],
        output=None if dwi is None else {"path": str(dwi), "shape": _shape(dwi), "bytes": dwi.stat().st_size},
        log_tail="" if result["exit"] == 0 else err[-2000:])
    return result


def _shape(path: Path):
    import nibabel as nib

    img = nib.load(path)
    return [list(img.shape), str(img.get_data_dtype())]


# ---------------------------------------------------------------------------------------------
# the floor: nibabel load of the input + nibabel save of the output


_FLOOR_LOAD = """
import sys, time, numpy as np, nibabel as nib
t = time.perf_counter(); a = np.asanyarray(nib.load(sys.argv[1]).dataobj); print(time.perf_counter() - t)
"""
_FLOOR_SAVE = """
import sys, time, numpy as np, nibabel as nib
src = nib.load(sys.argv[1]); img = nib.Nifti1Image(np.asanyarray(src.dataobj.get_unscaled()), src.affine, src.header)
t = time.perf_counter(); nib.save(img, sys.argv[2]); print(time.perf_counter() - t)
"""


def floor(input_dwi: Path, output_dwi: Path, scratch: Path) -> dict:
    """nibabel load of the input + nibabel save of the written output, each timed in its own
    process (wall of the call; CPU of the whole process, reading the output back included for
    the save: an upper bound of the save's CPU)."""
    load = run_monitored([sys.executable, "-c", _FLOOR_LOAD, str(input_dwi)], ROOT)
    target = scratch / "floor_save.nii.gz"
    save = run_monitored([sys.executable, "-c", _FLOOR_SAVE, str(output_dwi), str(target)], ROOT)
    load_s, save_s = float(load["stdout"].split()[-1]), float(save["stdout"].split()[-1])
    target.unlink(missing_ok=True)
    return {"load_s": round(load_s, 2), "save_s": round(save_s, 2), "wall_s": round(load_s + save_s, 2),
            "load_cpu_s": round(load["cpu_s"], 2), "save_cpu_s_upper": round(save["cpu_s"], 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subject", choices=("demo", "hcp", "hcp3", "both"), default="hcp")
    parser.add_argument("--method", nargs="+", default=["rish-global", "ldm"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="folder for the datasets (reused) and the runs")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--keep-runs", action="store_true",
                        help="keep each run's output and work folders (~5 GB each at HCP size)")
    parser.add_argument("--before", type=Path,
                        help="another checkout (e.g. `git archive` of an older commit): each repeat runs it "
                             "and this one, in the same conditions; reported as METHOD@before")
    parser.add_argument("--floor-each", action="store_true",
                        help="measure the floor again after every repeat (all methods), and give each "
                             "run's ratio to the floor of its own repeat: robust to a machine whose "
                             "speed drifts over minutes (a shared VM)")
    parser.add_argument("extra", nargs="*", help="more arguments for run.py (after --)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_participant_"))
    root.mkdir(parents=True, exist_ok=True)
    machine = (f"{platform.node()} {_cpu_model()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
               f"{time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"machine: {machine}")
    subjects = ("demo", "hcp") if args.subject == "both" else (args.subject,)
    everything = {"machine": machine, "subjects": {}}
    for name in subjects:
        bids = {"demo": make_demo, "hcp": make_hcp, "hcp3": make_hcp3}[name](root)
        input_dwi = next((bids / "sub-01").rglob("*_dwi.nii.gz"))
        runs = {}
        checkouts = ([("@before", args.before.resolve())] if args.before else []) + [("", ROOT)]
        output = None  # one written 7T-like DWI of this checkout, kept for the floor
        floors = []
        order = [(method, tag, repo) for method in args.method for tag, repo in checkouts]
        for repeat in range(args.repeats):
            this_round = []
            # each repeat starts with the next run of the order (measured: whatever ran first after
            # the floor, the floor's and the previous runs' writes still being flushed, was slower)
            shift = repeat % len(order)
            for method, tag, repo in order[shift:] + order[:shift]:
                _settle()
                scratch = root / f"run_{name}_{method}{tag.replace('@', '_')}_{time.time_ns()}"
                result = run_participant(bids, scratch, method, args.extra, repo)
                runs.setdefault(method + tag, []).append(result)
                this_round.append(result)
                print(name, method + tag, json.dumps(result), flush=True)
                if output is None and not tag and result["output"]:
                    output = root / f"{name}_floor_output.nii.gz"
                    shutil.move(result["output"]["path"], output)
                if not args.keep_runs:  # each run leaves ~5 GB (work folder, outputs) at HCP size
                    shutil.rmtree(scratch, ignore_errors=True)
            if args.floor_each and output is not None:
                _settle()
                floors.append(floor(input_dwi, output, root))
                for result in this_round:
                    result["floor_wall_s"] = floors[-1]["wall_s"]
                print(name, "floor", json.dumps(floors[-1]), flush=True)
        if not floors and output is not None:
            _settle()
            floors.append(floor(input_dwi, output, root))
        fl = ({key: round(statistics.median(f[key] for f in floors), 2) for key in floors[0]} | {"repeats": len(floors)}
              if floors else None)
        if output is not None:
            output.unlink(missing_ok=True)
        summary = {"floor": fl, "methods": {}}
        for method, results in runs.items():
            ok = [r for r in results if r["exit"] == 0]
            if not ok:
                summary["methods"][method] = {"failed": True}
                continue
            med = {k: round(statistics.median(r[k] for r in ok), 2) for k in ("wall_s", "cpu_s", "peak_rss_gb")}
            step_names = list(ok[0]["steps"])
            med["steps"] = {s: round(statistics.median(r["steps"][s] for r in ok if r["steps"].get(s) is not None), 2)
                            for s in step_names if any(r["steps"].get(s) is not None for r in ok)}
            if fl:
                med["ratio_wall"] = round(med["wall_s"] / fl["wall_s"], 2)
            paired = [r["wall_s"] / r["floor_wall_s"] for r in ok if r.get("floor_wall_s")]
            if paired:  # --floor-each: each run against the floor measured right after its repeat
                med["ratio_wall_each"] = [round(x, 2) for x in paired]
                med["ratio_wall_paired"] = round(statistics.median(paired), 2)
            by_role = [_cpu_by_role(r["cpu_s_by_process"]) for r in ok]
            med["cpu_s_by_role"] = {role: round(statistics.median(b.get(role, 0.0) for b in by_role), 2)
                                    for role in sorted({role for b in by_role for role in b})}
            med["repeats"] = len(ok)
            med["load_before"] = [r["load_before"][0] for r in ok]
            summary["methods"][method] = med
        everything["subjects"][name] = summary
        print(f"== {name}: floor {json.dumps(fl)}")
        for method, med in summary["methods"].items():
            print(f"== {name} {method}: {json.dumps(med)}")
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())

"""Orchestration: subjects -> scans -> files, optionally in parallel processes.

Every scan is an independent task (a paired subject gives two), so ``--nprocs 2`` simulates the
3T and 7T scans of one subject at the same time. A task recomputes its subject's anatomy from
the subject seed (cheap) instead of receiving large arrays, and writes its own files; results
are therefore identical whatever the number of processes.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .anatomy import lattice_spacing, random_subject, subject_tissue_lattice
from .scan import simulate_scan
from .writer import subject_label, write_dataset_files, write_scan


@dataclass(frozen=True)
class ScanTask:
    """One scan to simulate: subject label and seed, session (protocol name)."""

    label: str
    subject_seed: int
    session: str


def subject_seed(seed: int, index: int) -> int:
    """Seed of subject ``index`` (1-based) derived from the dataset seed."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def plan(settings) -> tuple[list[str], list[str], dict[str, dict], list[ScanTask]]:
    """Subject labels (paired, 3T-only), participants table rows and scan tasks."""
    total = settings.subjects + settings.only_3t
    paired = [subject_label(i, total) for i in range(1, settings.subjects + 1)]
    only_3t = [subject_label(i, total) for i in range(settings.subjects + 1, total + 1)]
    participants, tasks = {}, []
    for index, label in enumerate(paired + only_3t, start=1):
        seed = subject_seed(settings.seed, index)
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0xB1D5]))
        sessions = ["3T", "7T"] if label in paired else ["3T"]
        participants[label] = {"age": int(rng.integers(22, 36)), "sex": str(rng.choice(["F", "M"])), "sessions": ",".join(sessions)}
        tasks += [ScanTask(label, seed, session) for session in sessions]
    return paired, only_3t, participants, tasks


def simulate_task(root: Path, task: ScanTask, settings) -> str:
    """Simulate and write one scan; returns a short description."""
    scan = settings.scan(task.session)
    subject = random_subject(task.subject_seed)
    lattice = subject_tissue_lattice(subject, lattice_spacing(settings.voxel_scale))
    result = simulate_scan(subject, lattice, scan, settings.voxel_scale, noise_seed=task.subject_seed)
    provenance = {
        "Generator": "bids-dmri-ldm simulator",
        "PhysicsPreset": settings.physics,
        "SubjectSeed": task.subject_seed,
        "VoxelScale": settings.voxel_scale,
        **scan.provenance(),
        "NoiseSigma": round(result.sigma, 4),
        "GradientIsocentreMm": None if result.isocentre is None else [round(float(v), 3) for v in result.isocentre],
    }
    write_scan(root, task.label, scan.protocol, result, provenance)
    return f"sub-{task.label} ses-{task.session} {result.dwi.shape}"


def simulate_dataset(root: Path, settings, nprocs: int = 1) -> None:
    """Simulate every subject into ``root`` (an empty staging folder)."""
    paired, only_3t, participants, tasks = plan(settings)
    write_dataset_files(root, paired, only_3t, participants, settings.describe(), settings.physics)
    if nprocs == 1 or len(tasks) == 1:
        for task in tasks:
            simulate_task(root, task, settings)
        return
    with ProcessPoolExecutor(max_workers=min(nprocs, len(tasks))) as pool:
        futures = [pool.submit(simulate_task, root, task, settings) for task in tasks]
        for future in futures:
            future.result()

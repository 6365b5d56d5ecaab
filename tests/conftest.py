"""Shared fixtures: tiny synthetic BIDS datasets and dipy's real ``small_64D`` crop as BIDS.

Fixtures
--------
make_bids_dataset
    A factory ``make_bids_dataset(root=None, **options) -> SyntheticBids`` writing a small raw
    BIDS dataset (default: one participant, no sessions, one 3T run of 12×12×10 voxels at 2 mm,
    3 b0 + 30 directions at b=1000 + 6 at b=2000, gradients inherited from ``dwi.bval`` /
    ``dwi.bvec`` at the dataset root). See :func:`write_bids_dataset` for every option.
    The written datasets pass ``bids-validator-deno`` (checked in tests/bids/test_layout.py).
bids_dataset
    One default dataset (``make_bids_dataset()``), written once per test.
shared_bids_dataset
    A session-scoped, read-only dataset: participants 01/02 × sessions 1/2 × 3T/7T runs.
simulated_dataset
    Session-scoped factory ``simulated_dataset(voxel_scale) -> Path``: one paired 3T/7T subject
    of the project's simulator (``python -m bids_dmri_ldm.simulate``, seed 3) with its ground truth
    in ``derivatives/simulation``, written once per voxel scale and session (read-only).
small64d_bids
    dipy's bundled real DWI crop ``small_64D`` (10³ voxels, 2 mm, oblique affine, 1 b0 + 64
    directions at b≈1000) as a one-participant BIDS dataset. ``dipy.data.get_fnames`` only
    returns paths of files shipped inside the dipy wheel for this name (nothing is fetched).
    The original bvec table is N×3 with a NaN first row (the b0); here it is written 3×N as
    BIDS requires, with the NaN kept by default so readers must handle it
    (``nan_b0_bvec=False`` writes zeros instead, via ``make_small64d_bids``).

The signal model (all numbers documented in :func:`dwi_signal`): inside an ellipsoidal "brain"
an inner "white matter" core holds one prolate tensor with a known principal direction
(default ``(1, 1, 0)/√2`` in the FSL bvec frame = voxel axes, because the affine has a
negative determinant), the rest of the brain is isotropic (MD 0.8e-3 mm²/s), outside is 0.
The 7T runs use slightly different diffusivities and S0 so that their RISH features differ
from 3T (a toy difference, not physics; the real simulator lives in ``bids_dmri_ldm.simulate``).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

B_SHELLS = (1000.0, 2000.0)

#: Tensor eigenvalues (mm²/s) of the white-matter core per field strength (toy values).
WM_EIGENVALUES = {3.0: (1.7e-3, 0.3e-3, 0.3e-3), 7.0: (1.9e-3, 0.35e-3, 0.35e-3)}
#: Mean diffusivity (mm²/s) of the isotropic rest of the brain.
GM_MD = 0.8e-3
#: S0 (arbitrary units) per field strength.
S0_VALUE = {3.0: 1000.0, 7.0: 700.0}
#: Echo times (s) written to the sidecars (HCP values).
ECHO_TIME = {3.0: 0.0895, 7.0: 0.0712}


@dataclass
class SyntheticBids:
    """What :func:`write_bids_dataset` wrote, for assertions.

    Attributes
    ----------
    root : Path
        Dataset root.
    dwi_files : list of Path
        Every DWI NIfTI written, in creation order.
    bvals : ndarray (N,)
        b-values (s/mm²) of every run.
    bvecs : ndarray (N, 3)
        Unit gradient directions (zeros for b0), FSL convention = voxel axes here.
    affine : ndarray (4, 4)
        Voxel-to-world affine of every run (negative determinant).
    principal_direction : ndarray (3,)
        Principal eigenvector of the white-matter tensor, in the bvec (voxel) frame.
    wm_mask, brain_mask : ndarray (X, Y, Z) bool
        Where the tensor / any signal is.
    field_strengths : dict
        DWI file -> MagneticFieldStrength written (T), or None where omitted.
    """

    root: Path
    dwi_files: list[Path] = field(default_factory=list)
    bvals: np.ndarray | None = None
    bvecs: np.ndarray | None = None
    affine: np.ndarray | None = None
    principal_direction: np.ndarray | None = None
    wm_mask: np.ndarray | None = None
    brain_mask: np.ndarray | None = None
    field_strengths: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- gradients
def hemisphere_directions(n: int) -> np.ndarray:
    """``n`` near-uniform unit vectors on the upper hemisphere (Fibonacci lattice), (n, 3)."""
    i = np.arange(n) + 0.5
    z = 1.0 - i / n  # (0, 1]: upper hemisphere
    phi = np.pi * (1.0 + 5**0.5) * i
    r = np.sqrt(1.0 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)


def gradient_table(n_b0: int = 3, n_b1000: int = 30, n_b2000: int = 6):
    """b-values (N,) and unit bvecs (N, 3): b0s first and one in the middle, then shells.

    One b0 has b = 5 s/mm² (still a b0: b ≤ 50) as scanners often write.
    """
    dirs1 = hemisphere_directions(n_b1000)
    dirs2 = hemisphere_directions(n_b2000 + 1)[:n_b2000] @ _rotation_z(0.3).T
    half = n_b1000 // 2
    bvals = np.concatenate(
        [np.zeros(n_b0 - 1), np.full(half, 1000.0), [5.0], np.full(n_b1000 - half, 1000.0),
         np.full(n_b2000, 2000.0)]
    )
    bvecs = np.concatenate(
        [np.zeros((n_b0 - 1, 3)), dirs1[:half], np.zeros((1, 3)), dirs1[half:], dirs2]
    )
    return bvals, bvecs


def _rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


# --------------------------------------------------------------------------- signal
def phantom_masks(shape: Sequence[int]):
    """Brain ellipsoid (radius 0.85 of the half-extent) and its white-matter core (0.55)."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grids))
    return radius <= 0.85, radius <= 0.55


def dwi_signal(shape, bvals, bvecs, principal_direction, field_strength=3.0, snr=None, seed=0):
    """Noiseless (or Rician, when ``snr``) single-tensor DWI, (X, Y, Z, N) float32.

    White matter: S = S0 exp(-b gᵀ D g), D with eigenvalues ``WM_EIGENVALUES[B]`` and
    principal eigenvector ``principal_direction``; rest of the brain: S0 exp(-b MD_GM);
    outside the brain: 0 (plus noise). ``snr`` = S0 / σ of the Rician noise.
    """
    brain, wm = phantom_masks(shape)
    key = 7.0 if field_strength is not None and field_strength >= 5 else 3.0
    s0 = S0_VALUE[key]
    e1 = np.asarray(principal_direction, float)
    e1 = e1 / np.linalg.norm(e1)
    helper = np.array([0.0, 0.0, 1.0]) if abs(e1[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e2 = np.cross(e1, helper)
    e2 /= np.linalg.norm(e2)
    e3 = np.cross(e1, e2)
    evals = WM_EIGENVALUES[key]
    tensor = sum(lam * np.outer(v, v) for lam, v in zip(evals, (e1, e2, e3)))
    adc = np.einsum("ni,ij,nj->n", bvecs, tensor, bvecs)  # (N,)
    wm_signal = s0 * np.exp(-bvals * adc)
    gm_signal = s0 * np.exp(-bvals * GM_MD)
    data = np.zeros((*shape, len(bvals)), dtype=np.float64)
    data[brain] = gm_signal
    data[wm] = wm_signal
    if snr:
        rng = np.random.default_rng(seed)
        sigma = s0 / snr
        noise = rng.normal(0, sigma, (2, *data.shape))
        data = np.sqrt((data + noise[0]) ** 2 + noise[1] ** 2)
    return data.astype(np.float32), brain, wm


# --------------------------------------------------------------------------- files
def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_gradients(stem: Path, bvals: np.ndarray, bvecs: np.ndarray) -> None:
    """FSL-style files: ``stem.bval`` (1 row) and ``stem.bvec`` (3 rows)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.bval").write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    Path(f"{stem}.bvec").write_text(
        "\n".join(" ".join(f"{v:.8f}" for v in row) for row in np.asarray(bvecs).T) + "\n"
    )


def write_dataset_files(root: Path, subjects: Sequence[str], name: str) -> None:
    """dataset_description.json, README, participants.tsv/.json of a raw dataset."""
    root.mkdir(parents=True, exist_ok=True)
    _write_json(
        root / "dataset_description.json",
        {
            "Name": name,
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": ["bids-dmri-ldm tests"],
        },
    )
    (root / "README").write_text(
        f"{name}\n\nSynthetic diffusion MRI written by the bids-dmri-ldm test-suite.\n"
    )
    rows = "".join(f"sub-{s}\tn/a\n" for s in subjects)
    (root / "participants.tsv").write_text("participant_id\tage\n" + rows)
    _write_json(
        root / "participants.json",
        {"age": {"Description": "age of the participant", "Units": "year"}},
    )


def write_bids_dataset(
    root: Path,
    subjects: Sequence[str] = ("01",),
    sessions: Sequence[str | None] = (None,),
    field_strengths: Sequence[float | None] = (3.0,),
    inherit_gradients: bool = True,
    shape: Sequence[int] = (12, 12, 10),
    voxel_size: float = 2.0,
    n_b0: int = 3,
    n_b1000: int = 30,
    n_b2000: int = 6,
    principal_direction: Sequence[float] = (1.0, 1.0, 0.0),
    snr: float | None = None,
    seed: int = 0,
    write_field_strength: bool = True,
) -> SyntheticBids:
    """Write a tiny raw BIDS dataset of DWI runs.

    Parameters
    ----------
    root : Path
        Dataset root (created).
    subjects : sequence of str
        Participant labels without ``sub-``.
    sessions : sequence of str or None
        Session labels without ``ses-``; ``(None,)`` writes no session level.
    field_strengths : sequence of float or None
        One DWI run per value in every subject/session, with ``MagneticFieldStrength`` (T) in
        its sidecar. With more than one value the runs get ``acq-<B>T`` (e.g. ``acq-3T``);
        a ``None`` value or ``write_field_strength=False`` omits the field.
    inherit_gradients : bool
        True: one ``dwi.bval``/``dwi.bvec`` and a ``dwi.json`` of shared metadata at the dataset
        root (inheritance principle); False: gradients next to every run.
    shape, voxel_size :
        Grid (voxels) and isotropic voxel size (mm); affine ``diag(-v, v, v)`` (negative
        determinant, so FSL bvecs are in the voxel axes unchanged).
    n_b0, n_b1000, n_b2000 : int
        Volumes per shell (one b0 has b = 5).
    principal_direction : 3 floats
        White-matter fibre direction in the bvec frame (normalised).
    snr : float, optional
        S0/σ of Rician noise; None for noiseless data.
    seed : int
        Noise seed (each run uses ``seed + run index``).
    write_field_strength : bool
        False leaves ``MagneticFieldStrength`` out of every sidecar.

    Returns
    -------
    SyntheticBids
    """
    root = Path(root)
    subjects = [str(s) for s in subjects]
    write_dataset_files(root, subjects, "bids-dmri-ldm synthetic test dataset")
    bvals, bvecs = gradient_table(n_b0, n_b1000, n_b2000)
    shape = tuple(int(n) for n in shape)
    affine = np.diag([-voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = [voxel_size * shape[0] / 2, -voxel_size * shape[1] / 2, -voxel_size * shape[2] / 2]
    direction = np.asarray(principal_direction, float)
    direction /= np.linalg.norm(direction)
    info = SyntheticBids(root=root, bvals=bvals, bvecs=bvecs, affine=affine,
                         principal_direction=direction)
    shared = {"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05}
    if inherit_gradients:
        _write_gradients(root / "dwi", bvals, bvecs)
        _write_json(root / "dwi.json", shared)

    index = 0
    for sub in subjects:
        for ses in sessions:
            folder = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "dwi"
            for strength in field_strengths:
                parts = [f"sub-{sub}"] + ([f"ses-{ses}"] if ses else [])
                if len(field_strengths) > 1:
                    parts.append(f"acq-{_strength_label(strength, index)}")
                stem = folder / ("_".join(parts) + "_dwi")
                data, brain, wm = dwi_signal(shape, bvals, bvecs, direction, strength, snr,
                                             seed + index)
                folder.mkdir(parents=True, exist_ok=True)
                img = nib.Nifti1Image(data, affine)
                img.header.set_xyzt_units("mm", "sec")
                nib.save(img, f"{stem}.nii.gz")
                sidecar = {
                    "EchoTime": ECHO_TIME[7.0 if (strength or 0) >= 5 else 3.0],
                    "RepetitionTime": 7.0,
                }
                if write_field_strength and strength is not None:
                    sidecar["MagneticFieldStrength"] = strength
                if not inherit_gradients:
                    sidecar.update(shared)
                    _write_gradients(stem, bvals, bvecs)
                _write_json(Path(f"{stem}.json"), sidecar)
                info.dwi_files.append(Path(f"{stem}.nii.gz"))
                info.field_strengths[Path(f"{stem}.nii.gz")] = (
                    strength if write_field_strength else None
                )
                info.brain_mask, info.wm_mask = brain, wm
                index += 1
    return info


def _strength_label(strength: float | None, index: int) -> str:
    if strength is None:
        return f"unknown{index}"
    return f"{strength:g}T".replace(".", "p")


def make_small64d_bids(root: Path, nan_b0_bvec: bool = True, field_strength: float = 3.0):
    """dipy's real ``small_64D`` crop as ``root/sub-01/dwi/sub-01_dwi.*`` (returns paths).

    ``MagneticFieldStrength`` is not known for this crop; it is written as ``field_strength``
    (default 3 T) so the run counts as a source run.
    """
    from dipy.data import get_fnames

    fimg, fbval, fbvec = (Path(p) for p in get_fnames(name="small_64D"))
    root = Path(root)
    write_dataset_files(root, ["01"], "dipy small_64D as BIDS")
    folder = root / "sub-01" / "dwi"
    folder.mkdir(parents=True)
    img = nib.load(fimg)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header),
             folder / "sub-01_dwi.nii.gz")
    bvals = np.loadtxt(fbval)
    bvecs = np.loadtxt(fbvec)  # (65, 3), NaN first row
    if not nan_b0_bvec:
        bvecs = np.nan_to_num(bvecs)
    (folder / "sub-01_dwi.bval").write_text(" ".join(f"{b:.4f}" for b in bvals) + "\n")
    (folder / "sub-01_dwi.bvec").write_text(
        "\n".join(" ".join("nan" if np.isnan(v) else f"{v:.8f}" for v in row)
                  for row in bvecs.T) + "\n"
    )
    _write_json(folder / "sub-01_dwi.json",
                {"MagneticFieldStrength": field_strength, "EchoTime": 0.08,
                 "RepetitionTime": 7.0, "PhaseEncodingDirection": "j-",
                 "TotalReadoutTime": 0.05})
    return root, folder / "sub-01_dwi.nii.gz", bvals, bvecs


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def make_bids_dataset(tmp_path):
    """Factory: ``make_bids_dataset(root=None, **write_bids_dataset options)``.

    Without ``root`` each call writes to a fresh folder under ``tmp_path``.
    """
    counter = {"n": 0}

    def _make(root: Path | None = None, **options) -> SyntheticBids:
        if root is None:
            counter["n"] += 1
            root = tmp_path / f"bids{counter['n']}"
        return write_bids_dataset(root, **options)

    return _make


@pytest.fixture
def bids_dataset(make_bids_dataset) -> SyntheticBids:
    """The default synthetic dataset: sub-01, one 3T run, root-level dwi.bval/dwi.bvec."""
    return make_bids_dataset()


@pytest.fixture(scope="session")
def shared_bids_dataset(tmp_path_factory) -> SyntheticBids:
    """One read-only dataset for the whole session (do not modify it).

    Participants 01 and 02, sessions 1 and 2, a 3T (``acq-3T``) and a 7T (``acq-7T``) run in
    each session, gradients and shared metadata inherited from the dataset root.
    """
    return write_bids_dataset(
        tmp_path_factory.mktemp("shared") / "bids",
        subjects=("01", "02"), sessions=("1", "2"), field_strengths=(3.0, 7.0),
    )


@pytest.fixture(scope="session")
def simulated_dataset(tmp_path_factory):
    """Factory: ``simulated_dataset(voxel_scale)`` -> root of a simulated paired subject (cached)."""
    from bids_dmri_ldm.simulate.cli import main as simulate

    cache: dict[float, Path] = {}

    def _get(voxel_scale: float) -> Path:
        if voxel_scale not in cache:
            root = tmp_path_factory.mktemp(f"sim{voxel_scale:g}".replace(".", "p")) / "bids"
            code = simulate([str(root), "--subjects", "1", "--voxel-scale", f"{voxel_scale:g}", "--seed", "3",
                             "--nprocs", "1"])
            assert code == 0
            cache[voxel_scale] = root
        return cache[voxel_scale]

    return _get


def simulated_scan(root: Path, session: str):
    """``(dwi_file, bvals, mean_b0, mean_dw_b1000, truth_brain, affine)`` of a simulated scan."""
    folder = root / "sub-01" / f"ses-{session}" / "dwi"
    dwi = folder / f"sub-01_ses-{session}_dwi.nii.gz"
    img = nib.load(dwi)
    bvals = np.loadtxt(folder / f"sub-01_ses-{session}_dwi.bval")
    data = np.asanyarray(img.dataobj)
    b0 = data[..., bvals <= 50].astype(np.float32).mean(axis=-1)
    dw = data[..., np.abs(bvals - 1000) <= 100].astype(np.float32).mean(axis=-1)
    truth_file = (root / "derivatives" / "simulation" / "sub-01" / f"ses-{session}" / "dwi" /
                  f"sub-01_ses-{session}_desc-brain_mask.nii.gz")
    truth = np.asanyarray(nib.load(truth_file).dataobj) > 0
    return dwi, bvals, b0, dw, truth, img.affine


@pytest.fixture
def small64d_bids(tmp_path):
    """dipy's ``small_64D`` as BIDS; returns ``(root, dwi_path, bvals (65,), bvecs (65, 3))``."""
    return make_small64d_bids(tmp_path / "small64d")


@pytest.fixture
def validator():
    """Path of ``bids-validator-deno``, or skip when it is not installed."""
    exe = shutil.which("bids-validator-deno")
    if exe is None:
        candidate = Path(__import__("sys").executable).parent / "bids-validator-deno"
        exe = str(candidate) if candidate.exists() else None
    if exe is None:
        pytest.skip("bids-validator-deno is not installed (pip install bids-validator-deno)")
    return exe

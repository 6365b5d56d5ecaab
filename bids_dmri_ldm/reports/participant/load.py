"""Derivatives -> :class:`~.data.RunData`: the run's files by name (:data:`DERIVATIVE_NAMES`), its
source DWI, the samples the rebuild recorded, the warnings of the log.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlparse

import nibabel as nib
import numpy as np

from bids_dmri_ldm.bidsio.gradients import find_gradient_file
from bids_dmri_ldm.core.display import display_voxels
from bids_dmri_ldm.io.files import file_stamp
from bids_dmri_ldm.io.nifti import load_nifti
from bids_dmri_ldm.reports import figures
from bids_dmri_ldm.reports.html import (
    LOGGER,
)
from bids_dmri_ldm.reports.participant.compute import (
    fit_tensor_at,
    flatten,
    lattice_voxels,
)
from bids_dmri_ldm.reports.participant.data import RunData

#: Derivative files of one run, as suffixes appended to the run prefix (the
#: name of the 7T-like DWI up to ``desc-7Tlike_dwi.nii.gz``, i.e. the source
#: entities and ``res-``). Names as written by ``bidsio/derivatives.py``
#: (OUTPUT_SPECS); several candidates where the name is not settled yet (the
#: first that exists wins). Change only this table if the names change.
DERIVATIVE_NAMES: dict[str, tuple[str, ...]] = {
    "dwi": ("desc-7Tlike_dwi.nii.gz", "desc-7Tlike_dwi.nii"),
    "bval": ("desc-7Tlike_dwi.bval",),
    "bvec": ("desc-7Tlike_dwi.bvec",),
    "sidecar": ("desc-7Tlike_dwi.json",),
    "mask": ("desc-brain_mask.nii.gz",),
    "rish_source": ("model-rish_desc-source_dwimap.nii.gz",),
    "rish_predicted": ("model-rish_desc-7Tlike_dwimap.nii.gz",),
    "scale": ("model-rish_desc-scale_dwimap.nii.gz",),
    "uncertainty": ("model-rish_desc-7TlikeStd_dwimap.nii.gz", "model-rish_desc-std_dwimap.nii.gz",
                    "model-rish_desc-uncertainty_dwimap.nii.gz"),
}
#: Suffix that identifies the main output of a run (and defines its prefix).
RUN_SUFFIX = "desc-7Tlike_dwi.nii.gz"


# --------------------------------------------------------------------------
# derivative files -> arrays
# --------------------------------------------------------------------------
def run_prefix(dwi_path: str | Path) -> str:
    """Prefix of a run: the 7T-like DWI file name without ``desc-7Tlike_dwi.nii[.gz]``."""
    name = Path(dwi_path).name
    for suffix in DERIVATIVE_NAMES["dwi"]:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise ValueError(f"{name} is not a 7T-like DWI derivative (*_{RUN_SUFFIX})")


def find_derivative(dwi_path: str | Path, role: str) -> Path | None:
    """Path of a run's derivative by role (:data:`DERIVATIVE_NAMES`), or None."""
    dwi_path = Path(dwi_path)
    prefix = run_prefix(dwi_path)
    for suffix in DERIVATIVE_NAMES[role]:
        candidate = dwi_path.with_name(prefix + suffix)
        if candidate.exists():
            return candidate
    return None


def find_runs(output_dir: str | Path, subject_label: str) -> list[Path]:
    """7T-like DWI derivatives of one participant, sorted."""
    subject_dir = Path(output_dir) / f"sub-{subject_label}"
    found = {p for suffix in DERIVATIVE_NAMES["dwi"] for p in subject_dir.rglob(f"*_{suffix}")}
    return sorted(found)


def _canonical(img: nib.spatialimages.SpatialImage) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Data reoriented to the closest canonical orientation, its affine and the orientation."""
    ornt = nib.orientations.io_orientation(img.affine)
    data = np.asanyarray(img.dataobj)
    data = nib.orientations.apply_orientation(data, ornt)
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape[:3])
    return data, affine, ornt


def _canonical_vectors(evec: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Eigenvector components from original to canonical voxel axes (|e| only)."""
    out = np.empty_like(evec)
    for old_axis, (new_axis, _flip) in enumerate(ornt):
        out[..., int(new_axis)] = np.abs(evec[..., old_axis])
    return out


def _load_map(path: Path, shape: tuple[int, ...], records: Sequence[str | Path] = ()) -> np.ndarray:
    img = _map_from_copies(path, records)
    if img is None:
        img = load_nifti(path)  # ISA-L inflation
    data, _, _ = _canonical(img)
    data = np.asarray(data, np.float32)
    if data.shape[:3] != shape:
        raise ValueError(f"{path.name} has grid {data.shape[:3]}, the brain mask {shape}")
    if data.ndim == 3:
        data = data[..., None]
    return data


def _map_from_copies(path: Path, records: Sequence[str | Path]) -> nib.Nifti1Image | None:
    """The derivative map ``path`` read from the uncompressed per-shell maps it was stacked from
    (:func:`~bids_dmri_ldm.interfaces.steps.write_map_copies_record`), memory-mapped and
    concatenated: only when ``path`` is the very file recorded (same inode: a hard-linked
    derivative, same size and modification time) and no per-shell file changed since; else
    None (the map is then inflated)."""
    try:
        _, size, mtime_ns = file_stamp(path)  # the derivative's own path: a hard link of the recorded one
    except OSError:
        return None
    for record_path in records:
        try:
            for entry in json.loads(Path(record_path).read_text())["maps"]:
                stacked = entry["file"]
                if not (os.path.samefile(path, stacked["path"])
                        and (size, mtime_ns) == (stacked["size"], stacked["mtime_ns"])):
                    continue
                parts = []
                for copy in entry["copies"]:
                    if file_stamp(copy["path"])[1:] != (copy["size"], copy["mtime_ns"]):
                        raise ValueError(f"{copy['path']} changed since it was recorded")
                    parts.append(nib.load(copy["path"], mmap=True))
                arrays = [np.asanyarray(p.dataobj, dtype=np.float32).reshape(p.shape[:3] + (-1,)) for p in parts]
                # one shell: the memory map itself (no copy); several: their channels in order
                data = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=3)
                reference = nib.load(path)
                if data.shape != tuple(reference.shape) or not np.allclose(parts[0].affine, reference.affine):
                    raise ValueError(f"the recorded maps of {path.name} do not match its grid")
                LOGGER.debug("report: %s read from its uncompressed per-shell maps", path.name)
                return nib.Nifti1Image(data, reference.affine, reference.header)
        except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError):
            continue
    return None


def _shell_volumes(bvals: np.ndarray, bvecs: np.ndarray, n_volumes: int, shell: float | None):
    from bids_dmri_ldm.core.gradients import b0_mask, check_gradients, select_shell

    bvecs = check_gradients(bvals, bvecs, n_volumes)
    if shell is None:
        dw = bvals[~b0_mask(bvals)]
        values, counts = np.unique(np.round(dw, -2), return_counts=True)
        shell = float(values[np.argmax(counts)])
    selection = select_shell(bvals, bvecs, shell=shell)
    return selection


def read_voxels(
    img, ijk: np.ndarray, volumes: Sequence[int], mean_volumes: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray | None]:
    """Signal of some voxels of a 4D image, and optionally the mean of some volumes.

    An image read from a file is streamed once, front to back, volume by volume
    (:func:`bids_dmri_ldm.io.nifti.iter_nifti_volumes`: ISA-L inflation of a
    ``.nii.gz``, ~2x nibabel's zlib); memory holds one 3D volume, never the
    whole 4D series (an HCP-size 7T-like DWI is ~3 GB as float32). An image
    without a file is read through its ``dataobj``.

    Parameters
    ----------
    img : nibabel image, 4D
    ijk : ndarray of int, shape (V, 3)
        Voxel indices in the image's own (stored) axes.
    volumes : sequence of int
        Volumes to gather, in the order of the output columns.
    mean_volumes : sequence of int
        Volumes to average over the whole grid (e.g. the b0s).

    Returns
    -------
    signals : ndarray, shape (V, len(volumes)), float32
        Scaled values (``scl_slope``/``scl_inter`` applied).
    mean : ndarray, shape (X, Y, Z), float32, or None
    """
    from bids_dmri_ldm.io.nifti import iter_nifti_volumes, nifti_layout

    columns = {int(v): c for c, v in enumerate(volumes)}
    averaged = {int(v) for v in mean_volumes}
    signals = np.empty((len(ijk), len(columns)), np.float32)
    total = np.zeros(img.shape[:3], np.float64) if averaged else None
    index = tuple(np.asarray(ijk).T)
    filename = img.get_filename()
    if filename:
        layout = nifti_layout(filename)
        slope, inter = layout.slope, layout.inter
        stream = iter_nifti_volumes(filename, layout)
    else:
        slope, inter = 1.0, 0.0
        wanted = sorted(set(columns) | averaged)
        stream = ((k, np.asarray(img.dataobj[..., k], dtype=np.float32)) for k in wanted)
    for k, volume in stream:
        if k in columns:
            signals[:, columns[k]] = volume[index]
        if k in averaged:
            total += volume
    if slope != 1.0 or inter != 0.0:
        signals = signals * np.float32(slope) + np.float32(inter)
    mean = None
    if averaged:
        mean = (total / len(averaged) * slope + inter).astype(np.float32)
    return signals, mean


def _to_stored_indices(img, canonical_affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Voxel indices of a canonical grid mapped to the stored grid of ``img`` (nearest)."""
    transform = np.linalg.inv(img.affine) @ canonical_affine
    return np.rint(nib.affines.apply_affine(transform, ijk)).astype(int)


def _resolve_source(output_dir: Path, dwi_path: Path, sidecar: Mapping) -> Path:
    """The 3T source DWI named in the sidecar's ``Sources`` (BIDS URIs or paths)."""
    sources = sidecar.get("Sources") or sidecar.get("RawSources") or []
    if isinstance(sources, str):
        sources = [sources]
    links = {}
    description = output_dir / "dataset_description.json"
    if description.exists():
        links = json.loads(description.read_text()).get("DatasetLinks", {}) or {}
    for source in sources:
        if not re.search(r"_dwi\.nii(\.gz)?$", source):
            continue
        if source.startswith("bids:"):
            _, name, rel = source.split(":", 2)
            base = output_dir if name == "" else links.get(name)
            if base is None:
                continue
            base = Path(unquote(urlparse(base).path)) if "://" in str(base) else Path(base)
            if not base.is_absolute():
                base = output_dir / base
            candidate = base / rel
        else:
            candidate = Path(source) if Path(source).is_absolute() else output_dir / source
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"source DWI of {dwi_path.name} not found from Sources={sources!r}")


def load_run(
    dwi_path: str | Path,
    output_dir: str | Path | None = None,
    extra: Mapping | None = None,
    logger: logging.Logger | None = None,
) -> RunData:
    """Read one run's derivatives (and its 3T source DWI) into :class:`RunData`.

    Parameters
    ----------
    dwi_path : path-like
        The run's ``*_desc-7Tlike_dwi.nii.gz``.
    output_dir : path-like, optional
        Derivative dataset root (for ``DatasetLinks``); found from the path
        when None.
    extra : dict, optional
        ``source_dwi``, ``source_bval``, ``source_bvec`` (override the
        sidecar's Sources), ``warnings`` (list of str), ``label``.

    Returns
    -------
    RunData
        Missing or unreadable inputs are recorded in ``problems``; only a
        missing brain mask leaves nothing to show but tables.
    """
    logger = logger or LOGGER
    dwi_path = Path(dwi_path)
    extra = dict(extra or {})
    output_dir = Path(output_dir) if output_dir else _dataset_root(dwi_path)
    run = RunData(label=extra.get("label") or run_prefix(dwi_path).rstrip("_"),
                  warnings=[str(w) for w in extra.get("warnings", [])])

    def attempt(what, func, *args):
        try:
            return func(*args)
        except Exception as exc:  # noqa: BLE001 - recorded, shown in the report
            run.problems[what] = f"{type(exc).__name__}: {exc}"
            logger.warning("report of %s: cannot load %s: %s", run.label, what, exc)
            return None

    sidecar_path = find_derivative(dwi_path, "sidecar")
    if sidecar_path is not None:
        run.sidecar = attempt("sidecar", lambda: json.loads(sidecar_path.read_text())) or {}
    run.warnings += attempt("log", log_warnings, output_dir, source_key(run.label)) or []
    mask_path = find_derivative(dwi_path, "mask")
    if mask_path is None:
        run.problems["mask"] = "brain mask derivative not found"
        return run
    loaded = attempt("mask", lambda: _canonical(load_nifti(mask_path)))
    if loaded is None:
        return run
    mask, mask_affine, _ = loaded
    run.mask = np.asarray(mask) > 0
    shape = run.mask.shape
    # The two tensor fits (and their DWI reads) run in two threads while this one reads the maps:
    # ISA-L, numpy and dipy's fit release the GIL. The shell is settled first, so both fit the
    # same one.
    run.shell_bval = _output_shell(run, dwi_path)
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(attempt, "fa_out", _load_output_dwi, run, dwi_path, mask_affine,
                            extra.get("sample_files", ())),
                pool.submit(attempt, "fa_in", _load_source_fa, run, output_dir, dwi_path, mask_affine, extra)]
        for role in ("rish_source", "rish_predicted", "scale", "uncertainty"):
            path = find_derivative(dwi_path, role)
            if path is None:
                if role != "uncertainty":
                    run.problems[role] = "derivative not found"
                continue
            setattr(run, role, attempt(role, _load_map, path, shape, extra.get("map_copies", ())))
        for job in jobs:
            job.result()
    return run


def _output_shell(run: RunData, dwi_path: Path) -> float | None:
    """b-value of the shell the report fits tensors on (None when the gradients are unreadable:
    the output's loader then records the problem)."""
    from bids_dmri_ldm.core.gradients import load_gradients

    try:
        bvals, bvecs = load_gradients(find_derivative(dwi_path, "bval"), find_derivative(dwi_path, "bvec"))
        return _shell_volumes(bvals, bvecs, len(bvals), _sidecar_shell(run.sidecar)).shell_bval
    except Exception:  # noqa: BLE001 - reported by _load_output_dwi
        return None


_LOG_WARNING = re.compile(r"^\S+\s+WARNING\s+(?:[\w.]+:\s+)?(.*)$")


def log_warnings(output_dir: str | Path, run_key: str) -> list[str]:
    """Warnings about one run in the participant-level logs (``OUTPUT_DIR/logs/*.log``).

    Parameters
    ----------
    output_dir : path-like
        Derivative dataset root.
    run_key : str
        Entities of the source run (``sub-01_ses-3T``): a warning line
        mentions the run as ``<key>:`` or by its file name ``<key>_dwi...``.

    Returns
    -------
    list of str
        Messages without timestamp and logger name, oldest log first, each once.
    """
    mentions = (f"{run_key}:", f"{run_key}_dwi")
    found: dict[str, None] = {}
    for log in sorted((Path(output_dir) / "logs").glob("*.log")):
        try:
            lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            match = _LOG_WARNING.match(line)
            if match and any(m in line for m in mentions):
                found[match.group(1).strip()] = None
    return list(found)


def source_key(label: str) -> str:
    """Entities of the source run from a derivative prefix (drops ``res-``/``space-``)."""
    return "_".join(p for p in label.split("_") if p and not p.startswith(("res-", "space-")))


def _dataset_root(path: Path) -> Path:
    for folder in path.parents:
        if (folder / "dataset_description.json").exists():
            return folder
    return path.parents[len(path.parents) - 1]


def _load_output_dwi(run: RunData, dwi_path: Path, mask_affine: np.ndarray,
                     sample_files: Sequence[str | Path] = ()) -> None:
    """Mean b0 and FA / eigenvector of the 7T-like DWI on the displayed slices.

    The signal and mean b0 come from the samples the rebuild step recorded for this exact file
    (``sample_files``: :class:`~bids_dmri_ldm.interfaces.steps.ReportSamples`, matched by file
    size and gzip trailer) when one matches, else from the file (inflated once).
    """
    from bids_dmri_ldm.core.gradients import b0_mask, load_gradients

    img = nib.load(dwi_path, keep_file_open=True)
    if img.ndim != 4:
        raise ValueError(f"{dwi_path.name} is not 4D (shape {img.shape})")
    bvals, bvecs = load_gradients(find_derivative(dwi_path, "bval"), find_derivative(dwi_path, "bvec"))
    ornt = nib.orientations.io_orientation(img.affine)
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape[:3])
    shape = tuple(int(img.shape[int(axis)]) for axis in np.argsort(ornt[:, 0]))
    if shape != run.mask.shape or not np.allclose(affine, mask_affine, atol=1e-3):
        raise ValueError(f"{dwi_path.name} grid {img.shape[:3]} differs from the brain mask's")
    selection = _shell_volumes(bvals, bvecs, img.shape[3], _sidecar_shell(run.sidecar))
    run.shell_bval = selection.shell_bval
    where = display_voxels(run.mask, figures.select_slices(run.mask))
    stored = _to_stored_indices(img, affine, np.argwhere(where))
    samples = _recorded_samples(dwi_path, sample_files, stored, img.shape)
    if samples is not None:
        signals, mean_b0 = samples["signals"][:, selection.index], samples["mean_b0"]
    else:
        signals, mean_b0 = read_voxels(img, stored, selection.index, np.flatnonzero(b0_mask(bvals)))
    run.mean_b0 = nib.orientations.apply_orientation(mean_b0, ornt)
    fa, evec = fit_tensor_at(signals, bvals[selection.index], selection.bvecs[selection.index])
    run.fa_out = np.full(shape, np.nan, np.float32)
    run.evec_out = np.zeros(shape + (3,), np.float32)
    run.fa_out[where] = fa
    run.evec_out[where] = _canonical_vectors(evec, ornt)


def _recorded_samples(dwi_path: Path, sample_files: Sequence[str | Path], stored_ijk: np.ndarray,
                      shape: tuple[int, ...]) -> dict[str, np.ndarray] | None:
    """The rebuild's recorded samples of this very file (same size and last 8 bytes: the gzip
    CRC-32 and length) at the same voxels, or None."""
    if not sample_files:
        return None
    size = dwi_path.stat().st_size
    with open(dwi_path, "rb") as handle:
        handle.seek(-8, 2)
        tail = handle.read(8)
    for candidate in sample_files:
        try:
            with np.load(candidate) as recorded:
                if int(recorded["dwi_bytes"]) != size or recorded["dwi_tail"].tobytes() != tail:
                    continue
                samples = {k: recorded[k] for k in ("ijk", "signals", "mean_b0")}
        except (OSError, KeyError, ValueError):
            continue
        if (np.array_equal(samples["ijk"], stored_ijk) and samples["mean_b0"].shape == tuple(shape[:3])
                and samples["signals"].shape[1] == shape[3]):
            LOGGER.debug("report of %s: output signal from the rebuild's samples %s", dwi_path.name, candidate)
            return samples
    return None


def _sidecar_shell(sidecar: Mapping) -> float | None:
    for key, value in flatten(sidecar).items():
        if key.lower().split(".")[-1] in ("shell", "shell_bval", "shellbval"):
            try:
                return float(value)
            except (TypeError, ValueError):
                continue
    return None


def _load_source_fa(run: RunData, output_dir: Path, dwi_path: Path, out_affine: np.ndarray,
                    extra: Mapping) -> None:
    """FA of the 3T source, fitted at the input voxels nearest to the needed output voxels."""
    from bids_dmri_ldm.core.gradients import load_gradients

    source = Path(extra["source_dwi"]) if extra.get("source_dwi") else _resolve_source(
        output_dir, dwi_path, run.sidecar)
    bval = Path(extra["source_bval"]) if extra.get("source_bval") else find_gradient_file(source, ".bval")
    bvec = Path(extra["source_bvec"]) if extra.get("source_bvec") else find_gradient_file(source, ".bvec")
    img = nib.load(source, keep_file_open=True)
    if img.ndim != 4:
        raise ValueError(f"source {source.name} is not 4D (shape {img.shape})")
    bvals, bvecs = load_gradients(bval, bvec)
    shell = run.shell_bval if run.shell_bval is not None else _sidecar_shell(run.sidecar)
    selection = _shell_volumes(bvals, bvecs, img.shape[3], shell)
    needed = display_voxels(run.mask, figures.select_slices(run.mask)) | lattice_voxels(run.mask)
    out_ijk = np.argwhere(needed)
    world = nib.affines.apply_affine(out_affine, out_ijk)
    in_ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(img.affine), world)).astype(int)
    inside = np.all((in_ijk >= 0) & (in_ijk < np.array(img.shape[:3])), axis=1)
    # unique voxels through their linear indices: the same rows in the same (lexicographic) order
    # as np.unique(axis=0), which sorts rows as structured records (0.5 s at HCP size)
    in_shape = tuple(int(n) for n in img.shape[:3])
    linear, inverse = np.unique(np.ravel_multi_index(in_ijk[inside].T, in_shape), return_inverse=True)
    unique = np.column_stack(np.unravel_index(linear, in_shape))
    signals = _signals_from_copy(source, extra.get("source_copies", ()), img.shape, unique, selection.index)
    if signals is None:
        signals, _ = read_voxels(img, unique, selection.index)
    fa, evec = fit_tensor_at(signals, bvals[selection.index], selection.bvecs[selection.index])
    ornt = nib.orientations.io_orientation(img.affine)
    shape = run.mask.shape
    run.fa_in = np.full(shape, np.nan, np.float32)
    run.evec_in = np.zeros(shape + (3,), np.float32)
    target = tuple(out_ijk[inside].T)
    run.fa_in[target] = fa[inverse.ravel()]
    run.evec_in[target] = _canonical_vectors(evec, ornt)[inverse.ravel()]


def _signals_from_copy(source: Path, records: Sequence[str | Path], shape: tuple[int, ...], ijk: np.ndarray,
                       volumes: Sequence[int]) -> np.ndarray | None:
    """Signal ``(V, len(volumes))`` float32 of ``source`` at ``ijk`` (stored axes) read from an
    uncompressed copy of its volumes the load step recorded
    (:func:`~bids_dmri_ldm.interfaces.steps.inputs.write_source_copy_record`: the same resolved
    path, size and modification time, every volume wanted in it), memory-mapped; None when no
    record fits (the source is then read, inflated once)."""
    if not records:
        return None
    try:
        stamp = file_stamp(source)
    except OSError:
        return None
    for record_path in records:
        try:
            record = json.loads(Path(record_path).read_text())
            if (record["source"], record["size"], record["mtime_ns"]) != stamp:
                continue
            column = {int(t): c for c, t in enumerate(record["read_index"])}
            if any(int(v) not in column for v in volumes):
                continue
            copy = nib.load(record["copy"], mmap=True)
            if tuple(copy.shape) != (*shape[:3], len(column)):
                continue
            # image values stored unscaled (slope 1, no intercept): a memory map, read one volume
            # (contiguous in NIfTI order) at a time, each voxel by its index in the volume: not
            # every voxel's whole series at once, whose bytes lie one volume apart (0.6 s at HCP size)
            data = np.asanyarray(copy.dataobj)
            flat = np.ravel_multi_index(tuple(np.asarray(ijk).T), tuple(shape[:3]), order="F")
            signals = np.empty((len(flat), len(volumes)), dtype=np.float32, order="F")
            for c, v in enumerate(volumes):
                signals[:, c] = np.ravel(data[..., column[int(v)]], order="F").take(flat)
        except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError):
            continue
        LOGGER.debug("report: source signal of %s from its copy %s", source.name, record["copy"])
        return signals
    return None

"""Participant report: ``OUTPUT_DIR/sub-<label>.html``, one section per run.

Two layers:

- :func:`render_participant_report` takes :class:`RunData` (arrays and
  dicts) and writes the HTML; it never reads a derivative file, so it is
  tested on synthetic arrays.
- :func:`load_run` reads one run's derivatives by name
  (:data:`DERIVATIVE_NAMES`, the one table to change if the workflow renames
  its outputs) and the 3T source DWI named in the sidecar's ``Sources``;
  :func:`build_participant_report` and :func:`regenerate_reports` (for
  ``--reports-only``) glue the two.

Every figure is built through :func:`~bids_dmri_ldm.reports.html.report_section`:
a figure that fails (odd volume, missing optional map) shows its error
message in the report and is logged; the report is still written and the
run never fails because of it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import nibabel as nib
import numpy as np

from bids_dmri_ldm.bids.derivatives import parse_entities
from bids_dmri_ldm.core.display import display_voxels
from bids_dmri_ldm.io.files import atomic_write_text
from bids_dmri_ldm.io.nifti import load_nifti
from bids_dmri_ldm.reports import figures
from bids_dmri_ldm.reports.html import (
    LOGGER,
    ReportInputError,
    Section,
    figure_html,
    list_html,
    paragraph,
    render_document,
    report_section,
    table_html,
)

#: Derivative files of one run, as suffixes appended to the run prefix (the
#: name of the 7T-like DWI up to ``desc-7Tlike_dwi.nii.gz``, i.e. the source
#: entities and ``res-``). Names as written by ``bids/derivatives.py``
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
#: FA above which a brain voxel counts as white-matter-like in the summary.
WM_FA_THRESHOLD = 0.4
#: Every ``LATTICE_STEP``-th voxel along each axis is tensor-fitted for the
#: white-matter summary (1/27 of the brain): medians over ~1e5 voxels are
#: stable to the third digit, and the fit stays within the time budget.
LATTICE_STEP = 3
#: Sidecar keys shown first in the provenance table (case-insensitive substrings).
_PROVENANCE_FIRST = ("method", "model", "checksum", "sha", "t0", "guidance", "omega", "ddim",
                     "steps", "seed", "sample", "version", "runtime", "run_time", "time",
                     "device")


@dataclass
class RunData:
    """Everything the report shows for one run, as arrays on one grid.

    All volumes are ``(X, Y, Z[, n_orders])`` on the output grid, in the
    closest canonical (RAS) voxel orientation; any of them may be None.

    Attributes
    ----------
    label : str
        Run name (the derivative prefix, e.g. ``sub-01_ses-3T_run-1``).
    mask : ndarray of bool
    mean_b0 : ndarray
        Mean of the output's b0 volumes.
    rish_source, rish_predicted : ndarray, shape (X, Y, Z, n_orders)
        RISH_l of the 3T source and of the prediction (paper Eq. 1).
    scale : ndarray, shape (X, Y, Z, n_orders)
        lambda_l (paper Eq. 2).
    uncertainty : ndarray, shape (X, Y, Z, n_orders)
        Standard deviation over samples (``--num-samples`` > 1).
    fa_in, fa_out : ndarray
        FA of input and output (NaN where not fitted).
    evec_in, evec_out : ndarray, shape (X, Y, Z, 3)
        Principal eigenvectors, components in canonical voxel axes.
    orders : tuple of int
        SH orders on the last axis of the RISH maps.
    sidecar : dict
        JSON sidecar of the 7T-like DWI (provenance).
    warnings : list of str
        Warnings raised during the run.
    problems : dict
        ``{what: message}`` for inputs that could not be loaded; the sections
        that need them show the message.
    shell_bval : float or None
        b-value (s/mm²) of the shell the tensors were fitted on.
    """

    label: str
    mask: np.ndarray | None = None
    mean_b0: np.ndarray | None = None
    rish_source: np.ndarray | None = None
    rish_predicted: np.ndarray | None = None
    scale: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    fa_in: np.ndarray | None = None
    fa_out: np.ndarray | None = None
    evec_in: np.ndarray | None = None
    evec_out: np.ndarray | None = None
    orders: tuple[int, ...] = (0, 2, 4)
    sidecar: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)
    shell_bval: float | None = None


# --------------------------------------------------------------------------
# arrays -> HTML
# --------------------------------------------------------------------------
_INPUT_NAMES = {
    "mask": "brain mask", "mean_b0": "mean b0 (from the 7T-like DWI)",
    "rish_source": "source RISH maps", "rish_predicted": "predicted RISH maps",
    "scale": "scale maps", "uncertainty": "uncertainty map", "fa_in": "FA of the 3T input",
    "fa_out": "FA of the 7T-like output", "sidecar": "JSON sidecar",
}
# inputs loaded together: a failure of the first explains the others
_LOADED_BY = {"mean_b0": "fa_out", "evec_out": "fa_out", "evec_in": "fa_in"}


def _need(run: RunData, *names: str) -> None:
    """Raise ReportInputError naming the first missing input and why it is missing."""
    for name in names:
        if getattr(run, name) is None:
            key = name if name in run.problems else _LOADED_BY.get(name, name)
            reason = run.problems.get(key) or run.problems.get("mask") or "not found among the derivatives"
            raise ReportInputError(f"{_INPUT_NAMES.get(name, name)} not available: {reason}")


def _rish_blocks(run: RunData, index: int) -> list[str]:
    _need(run, "mask", "rish_source", "rish_predicted", "scale")
    order = run.orders[index]
    fig = figures.rish_mosaic(run.rish_source[..., index], run.rish_predicted[..., index],
                              run.scale[..., index], run.mask, order)
    return [figure_html(figures.to_png(fig), f"RISH L{order} mosaic",
                        f"RISH L{order} (paper Eq. 1) of the 3T source and of the 7T-like "
                        f"prediction on one grey scale, and the scale map λ{order} (Eq. 2) on a "
                        "diverging scale centred at 1 (red: 7T-like larger, blue: smaller). "
                        "Neurological view (patient right on the right).")]


def _fa_blocks(run: RunData) -> list[str]:
    _need(run, "mask", "fa_in", "fa_out")
    fig = figures.fa_figure(run.fa_in, run.fa_out, run.evec_in, run.evec_out, run.mask)
    return [figure_html(figures.to_png(fig), "FA and colour FA",
                        "FA (dipy TensorModel, OLS, b0 + the processed shell) of the 3T input and "
                        "the 7T-like output, their difference, and colour FA (red left-right, "
                        "green anterior-posterior, blue superior-inferior). The input is shown "
                        "on the output grid by nearest-neighbour sampling.")]


def _mask_blocks(run: RunData) -> list[str]:
    _need(run, "mask", "mean_b0")
    fig = figures.mask_overlay_figure(run.mean_b0, run.mask)
    return [figure_html(figures.to_png(fig), "brain mask over mean b0",
                        "Brain mask (red outline) over the mean b0 of the output.")]


def _uncertainty_blocks(run: RunData) -> list[str]:
    _need(run, "mask", "uncertainty")
    fig = figures.uncertainty_figure(run.uncertainty, run.mask, run.orders)
    return [figure_html(figures.to_png(fig), "uncertainty",
                        "Per-voxel standard deviation of the predicted RISH over the model's "
                        "samples (--num-samples).")]


def summary_numbers(
    scale: np.ndarray | None,
    mask: np.ndarray | None,
    fa: np.ndarray | None,
    orders: Sequence[int] = (0, 2, 4),
    fa_threshold: float = WM_FA_THRESHOLD,
) -> list[tuple]:
    """Median lambda_l in the brain and in white-matter-like voxels.

    Parameters
    ----------
    scale : ndarray, shape (X, Y, Z, n_orders)
        Scale maps lambda_l (paper Eq. 2).
    mask : ndarray of bool, shape (X, Y, Z)
    fa : ndarray, shape (X, Y, Z), or None
        FA of the 3T input; voxels with FA > ``fa_threshold`` (NaN = not
        fitted, excluded) are white-matter-like.
    orders : sequence of int

    Returns
    -------
    list of tuple
        Rows ``(quantity, value)``; ``None`` where undefined.
    """
    if scale is None or mask is None:
        raise ReportInputError("scale maps or brain mask not available")
    mask = np.asarray(mask).astype(bool)
    scale = np.asarray(scale, np.float64)
    if scale.shape[:3] != mask.shape:
        raise ValueError(f"scale maps {scale.shape} and mask {mask.shape} are on different grids")
    rows: list[tuple] = [("brain voxels", int(mask.sum()))]
    wm = None
    if fa is not None and np.shape(fa) == mask.shape:
        with np.errstate(invalid="ignore"):
            wm = mask & (np.asarray(fa) > fa_threshold)
        rows.append((f"WM-like voxels (FA > {fa_threshold:g}, of those fitted)", int(wm.sum())))
    for i, order in enumerate(orders[: scale.shape[-1]]):
        lam = scale[..., i]
        inside = lam[mask & np.isfinite(lam)]
        rows.append((f"median λ{order} in brain", float(np.median(inside)) if inside.size else None))
        if wm is not None:
            sel = lam[wm & np.isfinite(lam)]
            rows.append((f"median λ{order} in WM-like voxels",
                         float(np.median(sel)) if sel.size else None))
    return rows


def flatten(mapping: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested dict -> ``{"a.b": value}`` (lists of scalars kept as lists)."""
    flat: dict[str, object] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def provenance_rows(sidecar: Mapping) -> list[tuple[str, object]]:
    """Sidecar entries for the settings table, provenance keys first."""
    flat = {k: v for k, v in flatten(sidecar).items() if "warning" not in k.lower()}

    def rank(key: str) -> int:
        low = key.lower()
        return next((i for i, s in enumerate(_PROVENANCE_FIRST) if s in low), len(_PROVENANCE_FIRST))

    return [(k, flat[k]) for k in sorted(flat, key=lambda k: (rank(k), k))]


def sidecar_warnings(sidecar: Mapping) -> list[str]:
    """Warnings recorded in a sidecar (any key containing 'warning')."""
    found: list[str] = []
    for key, value in flatten(sidecar).items():
        if "warning" in key.lower():
            if isinstance(value, (list, tuple)):
                found.extend(str(v) for v in value)
            elif value:
                found.append(str(value))
    return found


def _settings_blocks(run: RunData) -> list[str]:
    if not run.sidecar:
        raise ReportInputError("JSON sidecar not available: "
                               + run.problems.get("sidecar", "not found among the derivatives"))
    return [table_html(provenance_rows(run.sidecar), header=("setting", "value"))]


def _summary_blocks(run: RunData) -> list[str]:
    _need(run, "mask", "scale")
    rows = summary_numbers(run.scale, run.mask, run.fa_in, run.orders)
    note = ("λ medians over all brain voxels; white-matter-like voxels are brain voxels with "
            f"input FA > {WM_FA_THRESHOLD:g} among those tensor-fitted (every {LATTICE_STEP}rd "
            "voxel along each axis and the displayed slices).")
    return [table_html(rows, header=("quantity", "value")), paragraph(note, "meta")]


def _warning_blocks(run: RunData) -> list[str]:
    items = list(dict.fromkeys(run.warnings + sidecar_warnings(run.sidecar)))
    items += [f"report input {k}: {v}" for k, v in run.problems.items()]
    return [list_html(items, "warnings")]


def run_sections(run: RunData, logger: logging.Logger | None = None) -> list[Section]:
    """Sections of one run: a heading, figures, tables and warnings.

    Each part is built through :func:`report_section`, so a failure shows
    as an error message in its place and is logged.
    """
    sections = [Section(title=run.label, level=2)]
    for i, order in enumerate(run.orders):
        sections.append(report_section(f"RISH L{order}: source, 7T-like and scale map λ{order}",
                                       _rish_blocks, run, i, logger=logger))
    sections.append(report_section("FA and colour FA: input, output and difference", _fa_blocks,
                                   run, logger=logger))
    sections.append(report_section("Brain mask over the mean b0", _mask_blocks, run, logger=logger))
    if run.uncertainty is not None or "uncertainty" in run.problems:
        sections.append(report_section("Uncertainty over samples", _uncertainty_blocks, run,
                                       logger=logger))
    sections.append(report_section("Summary numbers", _summary_blocks, run, logger=logger))
    sections.append(report_section("Settings and provenance", _settings_blocks, run, logger=logger))
    sections.append(report_section("Warnings raised during the run", _warning_blocks, run,
                                   logger=logger))
    return sections


def render_participant_report(
    path: str | Path, subject_label: str, runs: Sequence[RunData],
    logger: logging.Logger | None = None,
) -> Path:
    """Write the participant report from arrays (no derivative is read).

    Parameters
    ----------
    path : path-like
        Output HTML file (written atomically).
    subject_label : str
        Label without ``sub-``.
    runs : sequence of RunData

    Returns
    -------
    Path
        The written file.
    """
    logger = logger or LOGGER
    sections: list[Section] = []
    for run in runs:
        sections.extend(run_sections(run, logger))
    if not runs:
        sections.append(Section(title="No processed run found", level=2,
                                blocks=[paragraph("No 7T-like DWI was found for this participant.")]))
    from bids_dmri_ldm import __version__

    subtitle = (f"bids-dmri-ldm {__version__} · {len(runs)} run(s) · generated "
                f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    document = render_document(f"sub-{subject_label}: 3T → 7T-like diffusion MRI", sections, subtitle)
    return atomic_write_text(path, document)


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


def _load_map(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    data, _, _ = _canonical(load_nifti(path))  # ISA-L inflation
    data = np.asarray(data, np.float32)
    if data.shape[:3] != shape:
        raise ValueError(f"{path.name} has grid {data.shape[:3]}, the brain mask {shape}")
    if data.ndim == 3:
        data = data[..., None]
    return data


def lattice_voxels(mask: np.ndarray, step: int = LATTICE_STEP) -> np.ndarray:
    """Brain voxels on a regular lattice of every ``step``-th voxel."""
    lattice = np.zeros(mask.shape, bool)
    lattice[::step, ::step, ::step] = True
    return lattice & mask


def fit_tensor_at(
    signals: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """FA and principal eigenvector of a set of voxels (dipy TensorModel, OLS).

    ``core.metrics.tensor_fit`` with OLS instead of WLS: the report is
    visual and must stay within seconds; measured on this machine, dipy WLS
    took 80 µs per voxel and OLS 5 µs (108 volumes).

    Parameters
    ----------
    signals : ndarray, shape (V, N)
        DWI signal of V voxels, N volumes (b0 + one shell).
    bvals : ndarray, shape (N,)
        s/mm².
    bvecs : ndarray, shape (N, 3)
        Unit directions in voxel axes (FSL convention), zero for b0.

    Returns
    -------
    fa : ndarray, shape (V,)
    evec : ndarray, shape (V, 3)
    """
    from bids_dmri_ldm.core.metrics import tensor_fit

    with np.errstate(all="ignore"):
        # non-finite input voxels (NaN/inf in a raw scan) would break the whole OLS fit
        clean = np.nan_to_num(np.asarray(signals, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        fa, evec = tensor_fit(np.clip(clean, 1e-6, None), bvals, bvecs, fit_method="OLS", dtype=np.float64)
    return fa, np.nan_to_num(evec)


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


def _entities(name: str) -> set[str]:
    return {f"{key}-{value}" for key, value in parse_entities(name).items()}


def find_gradient_file(dwi: Path, extension: str) -> Path:
    """``.bval``/``.bvec`` of a raw DWI following the BIDS inheritance principle.

    The sibling with the same stem first, then the most specific ``*dwi<ext>``
    in the parent folders whose entities all belong to the DWI's name.
    """
    stem = re.sub(r"\.nii(\.gz)?$", "", dwi.name)
    sibling = dwi.with_name(stem + extension)
    if sibling.exists():
        return sibling
    wanted = _entities(dwi.name)
    for folder in dwi.parents:
        candidates = [p for p in folder.glob(f"*dwi{extension}") if _entities(p.name) <= wanted]
        if candidates:
            return max(candidates, key=lambda p: len(_entities(p.name)))
        if (folder / "dataset_description.json").exists():
            break
    raise FileNotFoundError(f"no {extension} file for {dwi.name}")


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
    for role in ("rish_source", "rish_predicted", "scale", "uncertainty"):
        path = find_derivative(dwi_path, role)
        if path is None:
            if role != "uncertainty":
                run.problems[role] = "derivative not found"
            continue
        setattr(run, role, attempt(role, _load_map, path, shape))
    # The two DWI reads (inflating a .nii.gz is most of the report's time) run side by side:
    # ISA-L and numpy release the GIL. The shell is settled first, so both fit the same one.
    run.shell_bval = _output_shell(run, dwi_path)
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(attempt, "fa_out", _load_output_dwi, run, dwi_path, mask_affine,
                            extra.get("sample_files", ())),
                pool.submit(attempt, "fa_in", _load_source_fa, run, output_dir, dwi_path, mask_affine, extra)]
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
    unique, inverse = np.unique(in_ijk[inside], axis=0, return_inverse=True)
    signals, _ = read_voxels(img, unique, selection.index)
    fa, evec = fit_tensor_at(signals, bvals[selection.index], selection.bvecs[selection.index])
    ornt = nib.orientations.io_orientation(img.affine)
    shape = run.mask.shape
    run.fa_in = np.full(shape, np.nan, np.float32)
    run.evec_in = np.zeros(shape + (3,), np.float32)
    target = tuple(out_ijk[inside].T)
    run.fa_in[target] = fa[inverse.ravel()]
    run.evec_in[target] = _canonical_vectors(evec, ornt)[inverse.ravel()]


# --------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------
def _strip_sub(label: str) -> str:
    return label.removeprefix("sub-")


def build_participant_report(
    output_dir: str | Path,
    subject_label: str,
    runs_info: Iterable[str | Path | Mapping | RunData] | None = None,
    logger: logging.Logger | None = None,
    sample_files: Sequence[str | Path] = (),
) -> Path:
    """Write ``OUTPUT_DIR/sub-<label>.html`` from a participant's derivatives.

    Parameters
    ----------
    output_dir : path-like
        Derivative dataset root.
    subject_label : str
        With or without ``sub-``.
    runs_info : iterable, optional
        One item per run: the path of its ``*_desc-7Tlike_dwi.nii.gz``; or a
        dict with ``dwi`` (that path) and optionally ``source_dwi``,
        ``source_bval``, ``source_bvec``, ``warnings`` (list of str raised
        during the run), ``label``; or a ready :class:`RunData`. When None,
        every 7T-like DWI of the participant under ``output_dir``.
    logger : logging.Logger, optional
        Receives a warning per part of the report that could not be made.
    sample_files : sequence of path-like
        Samples recorded by the rebuild step while it wrote the outputs
        (:class:`~bids_dmri_ldm.interfaces.steps.ReportSamples`); a run whose 7T-like DWI is
        the file one of them was recorded for is not read again.

    Returns
    -------
    Path
        The report. Never raises because a figure or an input failed; those
        failures appear in the report and the log.
    """
    logger = logger or LOGGER
    output_dir = Path(output_dir)
    label = _strip_sub(subject_label)
    start = time.perf_counter()
    if runs_info is None:
        runs_info = find_runs(output_dir, label)
    runs = []
    for item in runs_info:
        if isinstance(item, RunData):
            runs.append(item)
            continue
        extra = dict(item) if isinstance(item, Mapping) else {"dwi": item}
        extra.setdefault("sample_files", tuple(sample_files))
        try:
            runs.append(load_run(extra.pop("dwi"), output_dir, extra, logger))
        except Exception as exc:  # noqa: BLE001 - a bad run must not stop the report
            name = Path(str(item.get("dwi", "run") if isinstance(item, Mapping) else item)).name
            logger.warning("report: cannot read run %s: %s", name, exc)
            runs.append(RunData(label=name, problems={"run": f"{type(exc).__name__}: {exc}"}))
    path = render_participant_report(output_dir / f"sub-{label}.html", label, runs, logger)
    failed = sum(1 for r in runs for _ in r.problems)
    logger.info("report %s written in %.1f s (%d run(s), %d input problem(s))",
                path, time.perf_counter() - start, len(runs), failed)
    return path


def regenerate_reports(output_dir: str | Path, subject_labels: Iterable[str] | None = None) -> list[Path]:
    """Rebuild participant reports from existing derivatives (``--reports-only``).

    Parameters
    ----------
    output_dir : path-like
        Derivative dataset root.
    subject_labels : iterable of str, optional
        Labels with or without ``sub-``; every ``sub-*`` folder when None.

    Returns
    -------
    list of Path
        The reports written, one per participant.
    """
    output_dir = Path(output_dir)
    if subject_labels is None:
        subject_labels = sorted(p.name for p in output_dir.glob("sub-*") if p.is_dir())
    return [build_participant_report(output_dir, label) for label in subject_labels]

"""The derivative dataset as a whole: ``dataset_description.json``, ``.bidsignore``, provenance.

:func:`init_derivatives_dataset` creates the derivative root (``GeneratedBy`` with the
container, ``SourceDatasets`` and ``DatasetLinks`` pointing at the input); :func:`bids_uri`
names input files in sidecars (``bids:raw:<relative path>``); :func:`software_versions` is
the ``Software`` block of every sidecar. The files of one run are in :mod:`~.derivatives`.
"""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import OutputError
from ..io.files import atomic_write_json, atomic_write_text

BIDS_VERSION = "1.10.0"
CODE_URL = "https://github.com/bids-dmri-ldm/bids-dmri-ldm"
PIPELINE_NAME = "bids-dmri-ldm"
RAW_DATASET_KEY = "raw"
"""Key of the input dataset in ``DatasetLinks``; ``Sources`` use ``bids:raw:<relative path>``."""

BIDSIGNORE_LINES = (
    "*_dwi.bval",
    "*_dwi.bvec",
    "*_dwimap.nii.gz",
    "*_dwimap.json",
    "logs/",
    "models/",
    "training/",
    "*.html",
)

SOFTWARE_DISTRIBUTIONS = ("numpy", "scipy", "torch", "dipy", "nibabel", "nipype", "monai", "pybids")


class OutputWriteError(OutputError, OSError):
    """The derivative dataset cannot be written (permissions, disk); 73."""



def bids_uri(path: str | os.PathLike, dataset_root: str | os.PathLike, key: str = RAW_DATASET_KEY) -> str:
    """BIDS URI ``bids:<key>:<path relative to the dataset root>`` (POSIX separators).

    The path is taken as written (a symbolic link inside the dataset keeps its own name, e.g.
    the ``hcp2bids`` links), else with both sides resolved (a dataset reached through a
    symbolic link). Raises ValueError when ``path`` is outside the dataset.
    """
    try:
        rel = Path(os.path.abspath(path)).relative_to(Path(os.path.abspath(dataset_root)))
    except ValueError:
        rel = Path(os.path.realpath(path)).relative_to(Path(os.path.realpath(dataset_root)))
    return f"bids:{key}:{rel.as_posix()}"


def software_versions() -> dict[str, str]:
    """Versions of Python, this package and the libraries that shape the numbers."""
    versions = {"python": platform.python_version(), "bids-dmri-ldm": __version__}
    for dist in SOFTWARE_DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def container_info() -> dict[str, str] | None:
    """``GeneratedBy.Container`` when running in this project's image, else ``None``.

    The image sets ``BIDS_DMRI_LDM_IN_CONTAINER=1`` and ``BIDS_DMRI_LDM_IMAGE`` from the
    ``IMAGE_TAG`` build argument (Dockerfile), so the tag is the one the image was built as; an
    image built without ``IMAGE_TAG`` says ``bids-dmri-ldm:<version>``. Apptainer/Singularity
    are told apart from Docker by their own variables. Outside the image nothing is claimed.
    """
    if not (os.environ.get("BIDS_DMRI_LDM_IN_CONTAINER") or os.environ.get("BIDS_DMRI_LDM_IMAGE")):
        return None
    tag = os.environ.get("BIDS_DMRI_LDM_IMAGE") or f"bids-dmri-ldm:{__version__}"
    if os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"):
        return {"Type": "singularity", "Tag": tag}
    return {"Type": "docker", "Tag": tag}


def source_dataset(bids_dir: str | os.PathLike) -> dict[str, str]:
    """``Name``, ``DOI`` and ``Version`` of a dataset, where its ``dataset_description.json``
    gives them (``Name``, ``DatasetDOI``, ``DatasetVersion``); never a path."""
    try:
        raw = json.loads((Path(bids_dir) / "dataset_description.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    keys = {"Name": "Name", "DOI": "DatasetDOI", "Version": "DatasetVersion"}
    return {key: str(raw[field]) for key, field in keys.items() if raw.get(field)}


def dataset_link(target: str | os.PathLike, from_dir: str | os.PathLike) -> str:
    """``target`` as a POSIX path relative to ``from_dir`` (both resolved), e.g. ``../bids``.

    Used for ``DatasetLinks``: the link holds as long as the two datasets keep their relative
    places (moved or mounted together), and it names no mount point or absolute path.
    """
    return Path(os.path.relpath(os.path.realpath(target), os.path.realpath(from_dir))).as_posix()


def dataset_description(bids_dir: str | os.PathLike, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Derivative ``dataset_description.json`` content for outputs of ``bids_dir`` in ``output_dir``.

    The input is ``DatasetLinks.raw``, a path relative to ``output_dir`` (so ``bids:raw:...``
    URIs resolve wherever the two datasets are moved together), and ``SourceDatasets``
    ``bids:raw:`` with the input's ``Name``/``DOI``/``Version`` where it states them.
    """
    generated = {"Name": PIPELINE_NAME, "Version": __version__, "CodeURL": CODE_URL,
                 "Description": "3T to 7T-like diffusion MRI translation (RISH scale maps)"}
    container = container_info()
    if container:
        generated["Container"] = container
    source = {"URL": f"bids:{RAW_DATASET_KEY}:", **source_dataset(bids_dir)}
    return {
        "Name": f"{PIPELINE_NAME} outputs" + (f" of {source['Name']}" if "Name" in source else ""),
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [source],
        "DatasetLinks": {RAW_DATASET_KEY: dataset_link(bids_dir, output_dir)},
        "HowToAcknowledge": "Cite Zhu et al., When Diffusion MRI Meets Diffusion Model, MICCAI 2024.",
    }


def init_derivatives_dataset(output_dir: str | os.PathLike, bids_dir: str | os.PathLike) -> Path:
    """Create the derivative root: ``dataset_description.json``, ``.bidsignore``, ``logs/``.

    An existing ``dataset_description.json`` is kept (parallel participant jobs share it); the
    ``.bidsignore`` lines this pipeline needs are added if missing.

    Raises
    ------
    OutputWriteError
        When the folder cannot be created or written.
    """
    root = Path(output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / "logs").mkdir(exist_ok=True)
        description = root / "dataset_description.json"
        if not description.is_file():
            atomic_write_json(description, dataset_description(bids_dir, root))
        ignore = root / ".bidsignore"
        present = ignore.read_text().splitlines() if ignore.is_file() else []
        missing = [line for line in BIDSIGNORE_LINES if line not in present]
        if missing:
            atomic_write_text(ignore, "\n".join(present + missing) + "\n")
    except OSError as err:
        raise OutputWriteError(f"cannot write to output directory {root}: {err.strerror or err}") from None
    return root


__all__ = [
    "BIDSIGNORE_LINES",
    "BIDS_VERSION",
    "CODE_URL",
    "OutputWriteError",
    "PIPELINE_NAME",
    "RAW_DATASET_KEY",
    "SOFTWARE_DISTRIBUTIONS",
    "bids_uri",
    "container_info",
    "dataset_description",
    "dataset_link",
    "init_derivatives_dataset",
    "software_versions",
    "source_dataset",
]

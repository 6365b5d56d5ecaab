"""Model folders of every method: where they are found, and their checksums.

A model folder ("bundle") holds a method's model files and a ``sha256sum``-format list of their
checksums; the model's identity recorded in every derivative (``ModelSHA256``) is the SHA-256 of
that list, so it names the content of every listed file.

=============  ==================  =====================  =======================
method         shipped folder      marker file            checksum list
=============  ==================  =====================  =======================
``rish-global``  ``models/rish-global``  ``rish_global.json``   ``SHA256SUMS``
``ldm``        ``models/demo``       ``config.json``        ``checksums.sha256``
``cnn``        ``models/cnn-demo``   ``config.json``        ``checksums.sha256``
=============  ==================  =====================  =======================

The two checksum-list names are historical (rish-global models and learned bundles were
written by different code); each folder is written with its method's name, and
:func:`find_checksum_list` reads a folder with either, so models written before or by hand
with the other name load too.

Shipped models are searched in :func:`shipped_models_dirs` (``$BIDS_DMRI_LDM_MODELS``, then
``models/`` at the repository root, then ``bids_dmri_ldm/data/models/``); a ``--model-dir`` is
the model's own folder or a folder of models (:func:`resolve_model_dir`).

Only the standard library and :mod:`bids_dmri_ldm.errors`: reading a model's identity never
imports PyTorch or builds a network.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError, ModelNotFoundError

MODELS_ENV = "BIDS_DMRI_LDM_MODELS"
"""Environment variable naming an extra folder of shipped model folders (searched first)."""

BUNDLE_CHECKSUMS = "checksums.sha256"
"""Checksum list of a learned (ldm, cnn) bundle."""

RISH_GLOBAL_CHECKSUMS = "SHA256SUMS"
"""Checksum list of a rish-global model folder."""

CHECKSUM_LISTS = (BUNDLE_CHECKSUMS, RISH_GLOBAL_CHECKSUMS)
"""Every checksum-list name a model folder may use."""


@dataclass(frozen=True)
class ModelFolder:
    """How a method's model folder looks.

    Attributes
    ----------
    shipped : str
        Name of the shipped folder (under one of :func:`shipped_models_dirs`).
    marker : str
        File whose presence makes a folder a model of this method.
    checksums : str
        Name of the checksum list the method writes (the first one read).
    """

    shipped: str
    marker: str
    checksums: str

    @property
    def checksum_names(self) -> tuple[str, ...]:
        """Checksum-list names read, the method's own first."""
        return (self.checksums, *(n for n in CHECKSUM_LISTS if n != self.checksums))


MODEL_FOLDERS: dict[str, ModelFolder] = {
    "rish-global": ModelFolder("rish-global", "rish_global.json", RISH_GLOBAL_CHECKSUMS),
    "ldm": ModelFolder("demo", "config.json", BUNDLE_CHECKSUMS),
    "cnn": ModelFolder("cnn-demo", "config.json", BUNDLE_CHECKSUMS),
}
"""Method name -> its :class:`ModelFolder` (identity has no model)."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def find_checksum_list(folder: str | os.PathLike, names: tuple[str, ...] = CHECKSUM_LISTS) -> Path | None:
    """The first of ``names`` that is a file in ``folder`` (None when there is none)."""
    for name in names:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


_CHECKSUM_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *]?(\S.*)$")


def read_checksum_list(path: str | os.PathLike) -> dict[str, str]:
    """``{file name: hex sha256}`` of a ``sha256sum``-format list (``<hash>  <name>`` or
    ``<hash> *<name>``; blank lines ignored).

    Raises
    ------
    ValueError
        ``"malformed line <n>"`` for a line that is not a checksum and a name.
    """
    sums = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        match = _CHECKSUM_LINE.match(line.strip())
        if match is None:
            raise ValueError(f"malformed line {number}")
        sums[match.group(2).strip()] = match.group(1).lower()
    return sums


def listed_checksums(folder: str | os.PathLike, names: tuple[str, ...], error: type[Exception],
                     missing: str) -> tuple[Path, dict[str, str]]:
    """``(checksum list, {file name: sha256})`` of a model folder: the first of ``names`` found
    in ``folder``, read by :func:`read_checksum_list`.

    Raises
    ------
    error
        ``error(missing)`` when none of ``names`` is there; ``"<list>: malformed line <n>"``.
    """
    listing = find_checksum_list(folder, names)
    if listing is None:
        raise error(missing)
    try:
        return listing, read_checksum_list(listing)
    except ValueError as err:
        raise error(f"{listing}: {err}") from None


def checksum_list_text(folder: str | os.PathLike, names: Sequence[str]) -> str:
    """``sha256sum``-format list (``<hash>  <name>`` lines) of the files ``names`` in ``folder``,
    in the order given: what :func:`read_checksum_list` reads."""
    return "".join(f"{sha256_file(Path(folder) / name)}  {name}\n" for name in names)


def model_sha256(folder: str | os.PathLike, names: tuple[str, ...] = CHECKSUM_LISTS) -> str | None:
    """The model's identity: SHA-256 of its checksum list (None without one)."""
    listing = find_checksum_list(folder, names)
    return None if listing is None else sha256_file(listing)


def shipped_models_dirs() -> list[Path]:
    """Folders that may hold model folders shipped with the software, in search order.

    1. ``$BIDS_DMRI_LDM_MODELS`` when set (e.g. weights baked into a container);
    2. ``models/`` at the repository root (source checkout, editable install, container);
    3. ``bids_dmri_ldm/data/models/`` inside the installed package.
    """
    package_dir = Path(__file__).resolve().parent
    candidates = []
    if os.environ.get(MODELS_ENV):
        candidates.append(Path(os.environ[MODELS_ENV]).expanduser())
    candidates += [package_dir.parent / "models", package_dir / "data" / "models"]
    return candidates


def find_shipped_model(name: str, marker: str = "config.json") -> Path | None:
    """Folder ``name`` of the first shipped-models folder where it holds ``marker``, or None."""
    for base in shipped_models_dirs():
        if (base / name / marker).is_file():
            return base / name
    return None


def model_folder(method: str) -> ModelFolder:
    """The :class:`ModelFolder` of ``method`` (KeyError for a method without a model)."""
    return MODEL_FOLDERS[str(method)]


def resolve_model_dir(method: str, model_dir: str | os.PathLike | None) -> Path:
    """The model folder of ``method``.

    ``model_dir`` may be the model's own folder, a folder of models holding ``<method>/`` (or the
    shipped folder name, e.g. ``demo/``); ``None`` selects the shipped model
    (:func:`shipped_models_dirs`). The first candidate holding the method's marker file wins.

    When none does: a rish-global path is still returned (``<model_dir>/rish-global`` when that
    folder exists, else ``model_dir``; the shipped location when ``None``), whose loading then
    says what is missing; a learned method raises.

    Raises
    ------
    ModelNotFoundError
        No ldm/cnn bundle (``config.json``) in ``model_dir`` or among the shipped models.
    """
    method = str(method)
    kind = model_folder(method)
    if model_dir is None:
        found = find_shipped_model(kind.shipped, kind.marker)
        if found is not None:
            return found
        if kind.marker != "config.json":
            return shipped_models_dirs()[0] / kind.shipped
        raise ModelNotFoundError(
            f"no {method} model bundle found (models/{kind.shipped}/ is not installed); pass --model-dir "
            "with a bundle trained by the group level, or use --method rish-global")
    model_dir = Path(model_dir)
    for candidate in (model_dir, model_dir / method, model_dir / kind.shipped):
        if (candidate / kind.marker).is_file():
            return candidate
    if kind.marker != "config.json":
        return model_dir / method if (model_dir / method).is_dir() else model_dir
    if not model_dir.exists():
        raise ModelNotFoundError(f"{method} model directory {model_dir} does not exist")
    raise ModelNotFoundError(f"no {method} model bundle in {model_dir} (no config.json there or in "
                             f"{method}/); train one with the group level")



# ---------------------------------------------------------------------------------------------
# learned (ldm, cnn) bundles: which files, verified before anything reads them

WEIGHT_NAMES = ("vqvae3t", "vqvae7t", "unet", "sr")
"""Weight-file stems of an ldm bundle."""

CNN_WEIGHT_NAMES = ("cnn",)
"""Weight-file stem of a cnn bundle."""


def weight_names(config: dict) -> tuple[str, ...]:
    """Weight-file stems of a bundle of this config's method."""
    return CNN_WEIGHT_NAMES if config.get("method", "ldm") == "cnn" else WEIGHT_NAMES


def required_files(config: dict) -> tuple[str, ...]:
    """Files a bundle of this config's method must hold (all listed in its checksums)."""
    return ("config.json", "MODEL_CARD.md", *(f"{n}.safetensors" for n in weight_names(config)))


def bundle_checksums(path: str | os.PathLike) -> tuple[Path, dict[str, str]]:
    """``(checksum list, {file name: sha256})`` of a learned bundle.

    Raises
    ------
    BundleError
        The list is missing or malformed.
    """
    return listed_checksums(path, model_folder("ldm").checksum_names, BundleError,
                            f"model bundle {path} is incomplete: {BUNDLE_CHECKSUMS} is missing")


def verify_bundle(path: str | os.PathLike) -> dict[str, str]:
    """Check that every required file of a learned bundle is present, listed and matches its
    SHA-256 (``config.json`` first, then read to know the method's weight files); return
    ``{file name: sha256}``. Reads the files, builds nothing.

    Raises
    ------
    BundleError
        Missing folder, list or file; a file not listed; a checksum that does not match.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"model bundle directory {path} does not exist")
    listing, sums = bundle_checksums(path)
    _verify_file(path, "config.json", sums, listing.name)
    try:
        method_config = {"method": json.loads((path / "config.json").read_text()).get("method", "ldm")}
    except (json.JSONDecodeError, AttributeError) as err:
        raise BundleError(f"model bundle {path}: invalid config.json: {err}") from None
    for name in required_files(method_config):
        _verify_file(path, name, sums, listing.name)
    return sums


def _verify_file(path: Path, name: str, sums: dict[str, str], listing: str) -> None:
    """One required file of a bundle: listed, present, matching its checksum."""
    if name not in sums:
        raise BundleError(f"model bundle {path} is incomplete: {name} is not listed in {listing}")
    if not (path / name).is_file():
        raise BundleError(f"model bundle {path} is incomplete: {name} is missing")
    if sha256_file(path / name) != sums[name]:
        raise BundleError(f"model bundle {path}: {name} does not match its SHA-256 checksum "
                          "(file changed, truncated or corrupted); re-download or retrain")

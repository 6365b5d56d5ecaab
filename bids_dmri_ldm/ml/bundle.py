"""Model bundle: a directory of config.json, safetensors weights, SHA-256 checksums, model card.

Layout (``models/<name>/``)::

    config.json          architecture, normalisation, grid, per-order t0/omega, DDIM steps,
                         training data summary, software versions (MONAI-bundle-like metadata)
    vqvae3t.safetensors  3T VQ-VAE
    vqvae7t.safetensors  7T VQ-VAE (fine-tuned from the 3T weights, or trained from scratch)
    unet.safetensors     conditional latent diffusion UNet (+ class embedding)
    sr.safetensors       super-resolution head
    MODEL_CARD.md        what the model is, how it was trained, how it measured
    checksums.sha256     ``sha256sum`` format, one line per file above

Weights are read with ``safetensors`` only (never pickle / ``torch.load``), and only
after every file's SHA-256 matched. The bundle's own SHA-256 (:attr:`Bundle.sha256`, recorded
in every derivative made with it) is that of ``checksums.sha256``, so it names every file.
``config.json`` may record what the model was trained for (``trained_for``: shell, SH order,
RISH orders, signal normalisation; written by the group level).  Any problem raises :class:`BundleError` with a
one-line message naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .modelconfig import ConfigError, validate_config
from .networks import build_all

WEIGHT_NAMES = ("vqvae3t", "vqvae7t", "unet", "sr")
CHECKSUM_FILE = "checksums.sha256"
REQUIRED_FILES = ("config.json", "MODEL_CARD.md", *(f"{n}.safetensors" for n in WEIGHT_NAMES))


class BundleError(RuntimeError):
    """A model bundle is missing, incomplete, tampered with, truncated or incompatible."""


@dataclass
class Bundle:
    """A loaded, verified model bundle: ``config``, ``networks`` (eval mode) and ``path``.

    ``config_sha256`` is the SHA-256 of ``config.json``; ``sha256`` that of the checksum list
    (every file of the bundle; empty for a bundle assembled in memory).
    """

    config: dict[str, Any]
    networks: dict[str, nn.Module]
    path: Path
    config_sha256: str
    sha256: str = ""

    @property
    def name(self) -> str:
        return self.config["name"]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def software_versions() -> dict[str, str]:
    """Versions recorded in a bundle (as MONAI's bundle metadata does)."""
    import monai
    import numpy
    import safetensors

    from .._version import __version__
    return {"bids_dmri_ldm": __version__, "torch": torch.__version__, "monai": monai.__version__,
            "numpy": numpy.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version()}


def state_to_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict as contiguous CPU tensors, ready for safetensors."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_bundle(out_dir: str | Path, config: dict[str, Any], networks: dict[str, nn.Module],
                model_card: str) -> Path:
    """Write a bundle atomically (temporary sibling directory, then rename).

    An existing ``out_dir`` is replaced only after the new bundle is complete.
    """
    validate_config(config, "bundle")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in WEIGHT_NAMES:
            save_file(state_to_tensors(networks[name]), str(tmp / f"{name}.safetensors"),
                      metadata={"format": "pt", "network": name})
        (tmp / "MODEL_CARD.md").write_text(model_card)
        lines = [f"{sha256_file(tmp / f)}  {f}\n" for f in REQUIRED_FILES]
        (tmp / CHECKSUM_FILE).write_text("".join(lines))
        tmp.chmod(0o755)  # mkdtemp makes 0700; a shipped model must be world-readable
        for file in tmp.iterdir():
            file.chmod(0o644)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _read_checksums(path: Path) -> dict[str, str]:
    listing = path / CHECKSUM_FILE
    if not listing.is_file():
        raise BundleError(f"model bundle {path} is incomplete: {CHECKSUM_FILE} is missing")
    sums = {}
    for number, line in enumerate(listing.read_text().splitlines(), 1):
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise BundleError(f"model bundle {path}: malformed line {number} in {CHECKSUM_FILE}")
        sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def verify_bundle(path: str | Path) -> dict[str, str]:
    """Check that every required file is present, listed and matches its SHA-256."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"model bundle directory {path} does not exist")
    sums = _read_checksums(path)
    for name in REQUIRED_FILES:
        if name not in sums:
            raise BundleError(f"model bundle {path} is incomplete: {name} is not listed in {CHECKSUM_FILE}")
        if not (path / name).is_file():
            raise BundleError(f"model bundle {path} is incomplete: {name} is missing")
        if sha256_file(path / name) != sums[name]:
            raise BundleError(f"model bundle {path}: {name} does not match its SHA-256 checksum "
                              "(file changed, truncated or corrupted); re-download or retrain")
    return sums


def load_bundle(path: str | Path, device: torch.device | str = "cpu") -> Bundle:
    """Verify and load a bundle; networks are returned in eval mode on ``device``.

    Raises
    ------
    BundleError
        Missing directory/file, checksum mismatch, unreadable weights, invalid or
        incompatible config, weights that do not fit the architecture.
    """
    path = Path(path)
    sums = verify_bundle(path)
    try:
        config = json.loads((path / "config.json").read_text())
        validate_config(config, "bundle")
    except (json.JSONDecodeError, ConfigError, KeyError, TypeError) as err:
        raise BundleError(f"model bundle {path}: invalid config.json: {err}") from None
    networks = build_all(config)
    for name in WEIGHT_NAMES:
        file = path / f"{name}.safetensors"
        try:
            state = load_file(str(file), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise BundleError(f"model bundle {path}: cannot read {file.name}: {err}") from None
        try:
            networks[name].load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise BundleError(f"model bundle {path}: {file.name} does not fit the architecture "
                              f"in config.json ({first})") from None
        # channels-last 3D convolutions are faster with oneDNN (CPU) and cuDNN
        networks[name].to(device, memory_format=torch.channels_last_3d).eval()
    return Bundle(config, networks, path, sums["config.json"], sha256_file(path / CHECKSUM_FILE))


def model_card(config: dict[str, Any], command: str = "", training_time_s: float | None = None,
               machine: str = "", evaluation_markdown: str = "", notes: str = "") -> str:
    """MODEL_CARD.md text from a bundle config and training facts."""
    data = config.get("training_data", {})
    tr = config["translation"]
    lines = [
        f"# Model card: {config['name']}", "",
        config.get("description", ""), "",
        "## Method",
        ("Latent diffusion translation of RISH features from 3T to 7T-like diffusion MRI "
         "(Zhu et al., MICCAI 2024): 3T VQ-VAE encoder, deterministic DDIM inversion to t0, "
         "classifier-free-guided DDIM sampling toward the 7T class, 7T VQ-VAE decoder, "
         "super-resolution head."), "",
        "## Settings",
        f"- model grid: {config['grid']}; RISH orders: {config['orders']}",
        (f"- t0 per order: {tr['t0']}; guidance omega per order: {tr['guidance']}; "
         f"DDIM steps: {tr['ddim_steps']}; seed: {tr['seed']}"),
        f"- 7T VQ-VAE initialisation: {config['training']['vqvae7t_init']}", "",
        "## Training",
        f"- command: `{command}`" if command else "- command: (not recorded)",
        f"- data: {json.dumps(data)}",
        f"- training time: {training_time_s:.0f} s" if training_time_s is not None else "- training time: (not recorded)",
        f"- machine: {machine or platform.platform()}",
        f"- software: {json.dumps(config.get('software', {}))}",
        f"- created: {config.get('created', datetime.now(UTC).isoformat(timespec='seconds'))}", "",
    ]
    if evaluation_markdown:
        lines += ["## Evaluation", evaluation_markdown, ""]
    if notes:
        lines += ["## Notes", notes, ""]
    return "\n".join(lines)

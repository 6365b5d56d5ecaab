"""Model bundle: a directory of config.json, safetensors weights, SHA-256 checksums, model card.

Layout (``models/<name>/``)::

    config.json          architecture, normalisation, grid, per-order t0/omega, DDIM steps,
                         training data summary, software versions (MONAI-bundle-like metadata),
                         the group level's validation table
    vqvae3t.safetensors  3T VQ-VAE
    vqvae7t.safetensors  7T VQ-VAE (fine-tuned from the 3T weights, or trained from scratch)
    unet.safetensors     conditional latent diffusion UNet (+ class embedding)
    sr.safetensors       super-resolution head
    MODEL_CARD.md        what the model is, how it was trained, how it measured
    checksums.sha256     ``sha256sum`` format, one line per file above

A cnn-baseline bundle (``config.json`` with ``"method": "cnn"``) has one weight file,
``cnn.safetensors``, instead of the four.

Weights are read with ``safetensors`` only (never pickle / ``torch.load``), and only
after every file's SHA-256 matched. The bundle's own SHA-256 (:attr:`Bundle.sha256`, recorded
in every derivative made with it) is that of ``checksums.sha256``, so it names every file.
``config.json`` may record what the model was trained for (``trained_for``: shell, SH order,
RISH orders, signal normalisation; written by the group level).  Any problem raises :class:`BundleError` with a
one-line message naming the file.
"""
from __future__ import annotations

import json
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

from ..bundles import BUNDLE_CHECKSUMS as CHECKSUM_FILE
from ..bundles import (
    CNN_WEIGHT_NAMES,
    WEIGHT_NAMES,
    bundle_checksums,
    checksum_list_text,
    required_files,
    sha256_file,
    verify_bundle,
    weight_names,
)
from ..errors import BundleError
from ..io.files import atomic_write_text, replace_dir
from .modelconfig import ConfigError, validate_config
from .networks import build_all

REQUIRED_FILES = ("config.json", "MODEL_CARD.md", *(f"{n}.safetensors" for n in WEIGHT_NAMES))

__all__ = ["CHECKSUM_FILE", "CNN_WEIGHT_NAMES", "REQUIRED_FILES", "WEIGHT_NAMES", "Bundle", "BundleError",
           "attach_validation", "load_bundle", "model_card", "required_files", "save_bundle", "sha256_file",
           "verify_bundle", "weight_names"]


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

    @property
    def method(self) -> str:
        """``"ldm"`` or ``"cnn"``."""
        return self.config.get("method", "ldm")


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
        for name in weight_names(config):
            # one metadata key: safetensors writes the metadata map in a random order (Rust
            # HashMap; measured with 0.8.0), so two keys made the bytes, and the bundle's SHA-256
            # recorded in every sidecar, differ between saves of the same weights
            save_file(state_to_tensors(networks[name]), str(tmp / f"{name}.safetensors"),
                      metadata={"network": name})
        (tmp / "MODEL_CARD.md").write_text(model_card)
        (tmp / CHECKSUM_FILE).write_text(checksum_list_text(tmp, required_files(config)))
        tmp.chmod(0o755)  # mkdtemp makes 0700; a shipped model must be world-readable
        for file in tmp.iterdir():
            file.chmod(0o644)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def attach_validation(path: str | Path, table: dict[str, Any], markdown: str) -> None:
    """Record the group level's validation table in a written bundle.

    ``config.json["validation"] = table``, a "Validation" section in ``MODEL_CARD.md``, and the
    checksum list recomputed; each file is replaced atomically, the checksum list last, so an
    interrupted call leaves a bundle that fails verification rather than one that lies.
    """
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    config["validation"] = table
    validate_config(config, "bundle")
    card = (path / "MODEL_CARD.md").read_text().rstrip("\n")
    card = card.split("\n## Validation (group level)")[0].rstrip("\n")
    atomic_write_text(path / "config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(path / "MODEL_CARD.md", f"{card}\n\n## Validation (group level)\n{markdown}")
    atomic_write_text(path / CHECKSUM_FILE, checksum_list_text(path, required_files(config)))


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
    for name in weight_names(config):
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
    return Bundle(config, networks, path, sums["config.json"], sha256_file(bundle_checksums(path)[0]))


def model_card(config: dict[str, Any], command: str = "", training_time_s: float | None = None,
               machine: str = "", evaluation_markdown: str = "", notes: str = "") -> str:
    """MODEL_CARD.md text from a bundle config and training facts."""
    data = config.get("training_data", {})
    lines = [f"# Model card: {config['name']}", "", config.get("description", ""), "",
             "## Method", *_method_lines(config), "",
             "## Training",
             f"- command: `{command}`" if command else "- command: (not recorded)",
             f"- data: {json.dumps(data)}",
             f"- training time: {training_time_s:.0f} s" if training_time_s is not None
             else "- training time: (not recorded)",
             f"- machine: {machine or platform.platform()}",
             f"- software: {json.dumps(config.get('software', {}))}",
             f"- created: {config.get('created', datetime.now(UTC).isoformat(timespec='seconds'))}", ""]
    if evaluation_markdown:
        lines += ["## Evaluation", evaluation_markdown, ""]
    if notes:
        lines += ["## Notes", notes, ""]
    return "\n".join(lines)


def _method_lines(config: dict[str, Any]) -> list[str]:
    """What the model is and its settings, for the model card."""
    tr = config["translation"]
    scale = (f"- scale maps: reference {tr.get('scale_reference', 'roundtrip')}, smoothing sigma "
             f"{tr.get('scale_smoothing', 0.0)} model-grid voxels (>= 1e9: one brain-wide factor), strength "
             f"{tr.get('scale_strength', 1.0)}, gain {tr.get('scale_gain', 1.0)} (gain x lambda ** strength; "
             f"strength 0 and gain 1: the order is left unchanged; strength 0 and another gain: one brain-wide "
             f"factor fitted on the validation pairs)")
    if config.get("method", "ldm") == "cnn":
        return [("Supervised CNN baseline (the paper's Table 1 comparison, Karayumak et al. 2018 style): "
                 "a residual 3D UNet (MONAI) regressing the normalised 7T RISH from the 3T RISH on the model "
                 "grid, trained on position-paired participants."), "",
                "## Settings",
                f"- model grid: {config['grid']}; RISH orders: {config['orders']}; UNet {config['cnn']}", scale]
    return [("Latent diffusion translation of RISH features from 3T to 7T-like diffusion MRI "
             "(Zhu et al., MICCAI 2024): 3T VQ-VAE encoder, deterministic DDIM inversion to t0, "
             "classifier-free-guided DDIM sampling toward the 7T class, 7T VQ-VAE decoder, "
             "super-resolution head."), "",
            "## Settings",
            f"- model grid: {config['grid']}; RISH orders: {config['orders']}",
            (f"- t0 per order: {tr['t0']}; guidance omega per order: {tr['guidance']}; "
             f"DDIM steps: {tr['ddim_steps']}; seed: {tr['seed']}"),
            f"- 7T VQ-VAE initialisation: {config['training']['vqvae7t_init']}", scale]

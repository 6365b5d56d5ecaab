"""Run-wide settings, filled by the command-line parser.

Read only by ``cli/`` and ``workflows/base.py``; inner factories and the signal core take
explicit arguments instead.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Translation methods the command line offers (``--method``).
METHOD_CHOICES = ("identity", "rish-global", "ldm", "cnn")
SCALE_REFERENCES = ("input", "roundtrip")
"""Denominators of the ldm scale maps: the input 3T RISH, or its VQ-VAE round trip."""

#: Group-level training stages (``--stage``).
STAGE_CHOICES = ("vqvae3t", "vqvae7t", "ldm", "sr", "all")

#: Name of the model bundle shipped for the demo (``models/demo/config.json``).
DEMO_MODEL_NAME = "demo"

#: Environment variable that points to an extra folder of shipped model bundles.
MODELS_ENV = "BIDS_DMRI_LDM_MODELS"


def shipped_models_dirs() -> list[Path]:
    """Folders that may hold model bundles shipped with the software, in search order.

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


def find_shipped_model(name: str) -> Path | None:
    """Folder of the shipped model bundle ``name`` (one holding ``config.json``), or None."""
    for base in shipped_models_dirs():
        if (base / name / "config.json").is_file():
            return base / name
    return None


DEFAULT_METHOD = "ldm"
"""The default ``--method``: the latent diffusion model with the shipped ``models/demo`` bundle.
On held-out simulated subjects it beats ``identity`` in 7 of 8 of the paper's columns and the
simpler ``rish-global`` beats it in 6 of 8 (docs/evaluation_results.md); both shipped models are
demonstrations trained on simulated data."""


DEFAULT_TRAINING_SHELL = 1000.0
"""b-value (s/mm²) an ldm/cnn bundle is trained for when the group level gets no ``--shell`` (the
paper's shell)."""


def default_method() -> str:
    """The ``--method`` used when none is given: the one place this choice is made."""
    return DEFAULT_METHOD


@dataclass
class RunConfig:
    """Everything a participant or group run needs, after validation.

    Paths are absolute. ``output_resolution`` is in mm (``None`` keeps the input grid).
    ``shells`` and ``shell_tolerance`` are in s/mm².
    """

    bids_dir: Path
    output_dir: Path
    analysis_level: str  # "participant" | "group"
    work_dir: Path
    participant_labels: list[str] = field(default_factory=list)  # without "sub-"
    session_labels: list[str] = field(default_factory=list)  # without "ses-"
    bids_filters: dict[str, Any] = field(default_factory=dict)
    bids_database_dir: Path | None = None
    skip_bids_validation: bool = False
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float | None = None  # memory a run may use (None: what is available)
    device: str = "cpu"  # resolved: "cpu" | "cuda"
    method: str = "rish-global"
    model_dir: Path | None = None
    output_resolution: float | None = 1.05
    skull_strip: bool = False  # zero the DWI and RISH maps outside the brain mask
    shells: list[float] | None = None  # --shell: the shells to translate (None: every shell the model covers)
    shell_tolerance: float = 100.0
    output_gradients: tuple[Path, Path] | None = None  # --output-gradients BVAL BVEC
    sh_order_max: int = 4
    overwrite: bool = False
    seed: int = 0
    verbose: int = 0
    # LDM-specific overrides (None: use the model bundle's values)
    num_samples: int = 1
    ddim_steps: int | None = None
    t0: list[int] | None = None
    guidance: list[float] | None = None
    scale_reference: str | None = None  # "input" | "roundtrip"
    scale_smoothing: float | None = None  # sigma in model-grid voxels
    # group level
    train_config: Path | None = None
    stage: str = "all"
    resume: bool = False
    reports_only: bool = False

    @property
    def training_shell(self) -> float:
        """The one shell an ldm/cnn bundle is trained for at the group level: ``--shell`` (a single
        value), else :data:`DEFAULT_TRAINING_SHELL`."""
        return float(self.shells[0]) if self.shells else DEFAULT_TRAINING_SHELL

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view (paths as strings) for provenance."""
        out = {}
        for key, value in asdict(self).items():
            if isinstance(value, tuple):
                value = [str(v) if isinstance(v, Path) else v for v in value]
            out[key] = str(value) if isinstance(value, Path) else value
        return out

"""Run-wide settings, filled by the command-line parser.

Read only by ``cli/`` and ``workflows/base.py``; inner factories and the signal core take
explicit arguments instead.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .vocabulary import (
    ALL_STAGES,
    DEFAULT_METHOD,
    METHOD_CHOICES,
    SCALE_REFERENCES,
    STAGE_CHOICES,
)

__all__ = ["DEFAULT_METHOD", "DEFAULT_TRAINING_SHELL", "METHOD_CHOICES", "SCALE_REFERENCES", "STAGE_CHOICES",
           "RunConfig", "default_method"]

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
    precision: str = "auto"  # network arithmetic of ldm/cnn inference (vocabulary.PRECISIONS)
    method: str = DEFAULT_METHOD  # the command line's default (bids_dmri_ldm.vocabulary)
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
    stage: str = ALL_STAGES
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

"""Run-wide settings, filled by the command-line parser.

Read only by ``cli/`` and ``workflows/base.py``; inner factories and the signal core take
explicit arguments instead.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunConfig:
    """Everything a participant or group run needs, after validation.

    Paths are absolute. ``output_resolution`` is in mm (``None`` keeps the input grid).
    ``shell`` and ``shell_tolerance`` are in s/mm².
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
    device: str = "cpu"  # resolved: "cpu" | "cuda"
    method: str = "rish-global"
    model_dir: Path | None = None
    output_resolution: float | None = 1.05
    shell: float = 1000.0
    shell_tolerance: float = 100.0
    sh_order_max: int = 4
    overwrite: bool = False
    seed: int = 0
    verbose: int = 0
    # LDM-specific overrides (None: use the model bundle's values)
    num_samples: int = 1
    ddim_steps: int | None = None
    t0: list[int] | None = None
    guidance: list[float] | None = None
    # group level
    train_config: Path | None = None
    stage: str = "all"
    resume: bool = False
    reports_only: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view (paths as strings) for provenance."""
        out = {}
        for key, value in asdict(self).items():
            out[key] = str(value) if isinstance(value, Path) else value
        return out

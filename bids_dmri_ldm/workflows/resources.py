"""Pre-flight memory estimate of a participant run, and the memory this machine offers.

The estimate comes from the header only (grid, volumes, on-disk type) and the settings (shell
volumes kept, SH order, output voxel size), before any voxel is read. It follows how the steps
of :mod:`bids_dmri_ldm.interfaces.steps` hold their arrays (float32 = 4 bytes per value):

``load``
    the volumes are streamed one at a time (a stored volume, its float64 and float32 copies, two
    float64 sums and the NaN map): ``V_in (b + 45)``.
``fit``
    one shell at a time: the b0s and the largest shell's volumes, their S/S0 copy and the SH
    coefficients (and their RISH): ``4 V_in (2 (n_b0 + M) + 2 K)``.
``grid``
    resampling one shell's coefficients to the output grid and scaling them there: the input
    coefficients, three coefficient arrays on the output grid, and one rebuild batch
    (:data:`~bids_dmri_ldm.core.rebuild.REBUILD_BATCH_BYTES`): ``4 (V_in K + 3 V_out K) + 256 MiB``.
``rebuild``
    the coefficients of every fitted shell on the output grid, S0 and two output volumes, and
    one batch: ``4 V_out (n_shells K + 3) + 256 MiB``.

each plus :data:`PROCESS_BYTES` for the worker itself; the run's peak is the largest step.
``V`` are voxels per volume, ``b`` the bytes per stored value, ``n_b0`` the b0s, ``M`` the
volumes of the largest fitted shell, ``n_shells`` the fitted shells, ``K = (L+1)(L+2)/2`` the SH
coefficients of order ``L``. The brain's share of the grid is not known before the mask is made,
so the masked steps are counted on the whole grid: an upper bound. Against the peak RSS measured
in docs/performance.md: the demo (48x58x48x288 int16 -> 171x207x171, three shells of 90 and 18
b0s, L = 4) is estimated at 1.7 GiB, an HCP-size scan (145x174x145x288 int16 -> 173x207x173) at
3.7 GiB (the per-shell fit).

The memory offered is the kernel's ``MemAvailable`` or, inside a container or a batch job with a
cgroup limit, that limit minus what the cgroup uses, whichever is smaller; ``--mem-gb`` replaces
it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.rebuild import (
    REBUILD_BATCH_BYTES,  # the rebuild's (batch, n_region) temporary
)

GIB = 2**30
PROCESS_BYTES = 350 * 2**20
"""Resident size of a worker before it reads any data (Python, numpy, nibabel, nipype, torch;
measured 340 MiB)."""


NIFTI1_MAX_DIM = 32767
"""Largest size of a NIfTI-1 image axis (the header stores it as int16)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes each heavy step of a run needs (``load``, ``fit``, ``grid``, ``model``) and the peak."""

    steps: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(self.steps.values(), default=PROCESS_BYTES)


def sh_coefficients(sh_order_max: int) -> int:
    """Number of even-order real SH coefficients up to ``sh_order_max``."""
    return (sh_order_max + 1) * (sh_order_max + 2) // 2


def estimate_run_memory(shape: tuple[int, ...], itemsize: int, n_kept: int, sh_order_max: int,
                        out_shape: tuple[int, ...], model_bytes: int = 0, shell_volumes: int | None = None,
                        n_b0: int = 0, n_fitted: int = 1) -> MemoryEstimate:
    """Memory of each step of one run (see the module docstring for the model).

    Parameters
    ----------
    shape : tuple
        Input image shape ``(X, Y, Z, N)``.
    itemsize : int
        Bytes per stored value (2 for int16, 4 for float32, ...).
    n_kept : int
        Volumes read (b0s, fitted shells, carried volumes).
    sh_order_max : int
    out_shape : tuple of 3 ints
        Output grid (equal to the input grid at native resolution).
    model_bytes : int
        Size of the translation model's weight files (0 for methods without networks).
    shell_volumes : int, optional
        Volumes of the largest fitted shell (default: ``n_kept - n_b0``).
    n_b0 : int
        b0 volumes.
    n_fitted : int
        Fitted shells.
    """
    v_in = math.prod(int(n) for n in shape[:3])
    v_out = math.prod(int(n) for n in out_shape[:3])
    k = sh_coefficients(sh_order_max)
    per_shell = (n_kept - n_b0) if shell_volumes is None else int(shell_volumes)
    steps = {
        "load": v_in * (int(itemsize) + 45),
        "fit": 4 * v_in * (2 * (n_b0 + per_shell) + 2 * k),
        "grid": 4 * (v_in * k + 3 * v_out * k) + REBUILD_BATCH_BYTES,
        "rebuild": 4 * v_out * (max(1, n_fitted) * k + 3) + REBUILD_BATCH_BYTES,
        # weights, a copy while loading, and activations on the model's small grid; the
        # scale-map step's nearest-inside index for the fill (three int32 per voxel), made beside
        # the prediction
        "model": 4 * v_in * 3 * 4 + 4 * 3 * v_in + 4 * int(model_bytes),
    }
    return MemoryEstimate({name: PROCESS_BYTES + int(value) for name, value in steps.items()})


def model_weight_bytes(model_dir: str | os.PathLike | None) -> int:
    """Total size of the ``*.safetensors`` files of a model folder (0 when there are none)."""
    if model_dir is None or not Path(model_dir).is_dir():
        return 0
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors") if p.is_file())


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2, else v1), or None without a limit."""
    candidates = [(Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
                  (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
                   Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"))]
    for limit_file, usage_file in candidates:
        try:
            limit_text = limit_file.read_text().strip()
        except OSError:
            continue
        if limit_text == "max":
            return None
        try:
            limit = int(limit_text)
            usage = int(usage_file.read_text().strip()) if usage_file.is_file() else 0
        except (OSError, ValueError):
            return None
        if limit >= 2**60:  # cgroup v1's "unlimited"
            return None
        return max(0, limit - usage)
    return None


def available_memory() -> tuple[int | None, str]:
    """Bytes of memory available to this process now, and where the number comes from."""
    found = [(value, source) for value, source in ((_meminfo_available(), "free memory"),
                                                   (_cgroup_available(), "the container's memory limit"))
             if value is not None]
    if not found:
        return None, "unknown"
    return min(found)


def format_bytes(n_bytes: float) -> str:
    """``1.3 GB``-style size (powers of 1024, as ``free -h`` shows them)."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit in ("B", "KiB") else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover

"""The one place where the torch device is chosen.

Nothing else in the package calls ``torch.cuda.is_available()`` to pick a device: the command
line resolves ``--device`` here once (at argument parsing, before any work starts) and passes
the resulting device name down explicitly.

GPU detection uses PyTorch's NVML-based check (``PYTORCH_NVML_BASED_CUDA_CHECK=1``), which
does not initialise the CUDA runtime in the calling process. That keeps the main process
fork-safe, so nipype's MultiProc workers can still use the GPU after the check.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICE_CHOICES", "DeviceUnavailableError", "cuda_available", "resolve_device",
           "resolve_device_type", "torch_built_for_gpu"]

#: Values accepted by ``--device``.
DEVICE_CHOICES = ("auto", "cpu", "cuda")

_GPU_HINT = (
    "pass the GPU to the container (`docker run --gpus all ...` or `apptainer run --nv ...`), "
    "install a CUDA build of PyTorch, or use --device cpu"
)

IMAGE_VARIANT_ENV = "BIDS_DMRI_LDM_TORCH_VARIANT"
"""Set in the container image to the PyTorch variant it was built with (``cpu`` or ``cuda``)."""

_CPU_IMAGE_HINT = (
    "this is the CPU-only image of bids-dmri-ldm (built with TORCH_VARIANT=cpu), which cannot use a "
    "GPU whatever is passed to it: run the CUDA image instead (the default build, `docker build -t "
    "bids-dmri-ldm .`) with `docker run --gpus all ...` or `apptainer run --nv ...`, or use --device cpu"
)


def _no_cuda_build_hint() -> str:
    """What to do when this PyTorch has no CUDA: in the CPU image, name the CUDA image."""
    if os.environ.get(IMAGE_VARIANT_ENV, "").strip().lower() == "cpu":
        return _CPU_IMAGE_HINT
    return _GPU_HINT


class DeviceUnavailableError(RuntimeError):
    """The requested device cannot be used on this machine."""


#: Fields of ``torch/version.py`` naming the GPU toolkit a PyTorch build was made with (None: none).
_GPU_BUILD_FIELDS = ("cuda", "hip", "rocm")


def _torch_version_file() -> Path:
    """``version.py`` of the installed torch package, found without importing it (IndexError:
    no torch package)."""
    spec = importlib.util.find_spec("torch")
    folders = list(spec.submodule_search_locations or []) if spec else []
    return Path(folders[0], "version.py")


def torch_built_for_gpu() -> bool:
    """Whether the installed PyTorch was built with CUDA (or ROCm), without importing torch.

    Importing torch costs ~1 s of CPU on 2 cores, in the main process of every run, when all the
    answer needs is one line of the ``torch/version.py`` that every PyTorch build writes
    (``cuda: Optional[str] = None`` in a CPU build). The file is parsed, not executed. An
    already imported torch is asked directly; a missing or unexpected file answers ``True``
    (unknown: :func:`cuda_available` then imports torch and asks it).
    """
    loaded = sys.modules.get("torch")
    if loaded is not None and hasattr(loaded, "backends"):
        return bool(loaded.backends.cuda.is_built())
    try:
        tree = ast.parse(_torch_version_file().read_text(encoding="utf-8"))
    except (ImportError, IndexError, OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return True
    fields = {}
    for statement in tree.body:
        if isinstance(statement, ast.AnnAssign):
            targets = [statement.target]
        elif isinstance(statement, ast.Assign):
            targets = statement.targets
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name) and target.id in _GPU_BUILD_FIELDS:
                fields[target.id] = statement.value
    if "cuda" not in fields:
        return True
    return any(not (isinstance(value, ast.Constant) and value.value is None) for value in fields.values())


def cuda_available() -> bool:
    """Whether at least one CUDA device is visible, without initialising CUDA.

    A PyTorch built without CUDA answers ``False`` without being imported
    (:func:`torch_built_for_gpu`).

    Returns
    -------
    bool
        ``True`` when this PyTorch build has CUDA support and a device is visible.
    """
    if not torch_built_for_gpu():
        return False
    import torch

    if not torch.backends.cuda.is_built():
        return False
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0


def resolve_device(requested: str = "auto") -> torch.device:
    """Turn a ``--device`` choice into a concrete ``torch.device``.

    Parameters
    ----------
    requested : {"auto", "cpu", "cuda"} or str
        ``auto`` picks the first CUDA device when one is usable, else the CPU. ``cuda`` (or
        ``cuda:N``) requires a usable GPU. ``cpu`` always works.

    Returns
    -------
    torch.device

    Raises
    ------
    DeviceUnavailableError
        ``cuda`` was requested but no usable GPU is visible (message says how to pass one).
    ValueError
        ``requested`` is not a known device name.
    """
    import torch

    name = str(requested).strip().lower()
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda") if cuda_available() else torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.backends.cuda.is_built():
            raise DeviceUnavailableError(
                f"--device {name} requested but this PyTorch build ({torch.__version__}) has no "
                f"CUDA support: {_no_cuda_build_hint()}"
            )
        if not cuda_available():
            raise DeviceUnavailableError(
                f"--device {name} requested but no CUDA GPU is visible: {_GPU_HINT}"
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"--device {name} requested but only {torch.cuda.device_count()} CUDA "
                "device(s) are visible (check CUDA_VISIBLE_DEVICES)"
            )
        return device
    raise ValueError(f"unknown device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)}")


def resolve_device_type(requested: str = "auto") -> str:
    """The device type (``"cpu"`` or ``"cuda"``) :func:`resolve_device` picks for ``requested``.

    ``cpu``, and ``auto`` where this PyTorch has no GPU support (:func:`torch_built_for_gpu`),
    answer without importing torch: the command line checks ``--device`` in the main process,
    which otherwise never needs torch for the participant level (its workers import it).
    Raises as :func:`resolve_device` does.
    """
    name = str(requested).strip().lower()
    if name == "cpu" or (name == "auto" and not cuda_available()):
        return "cpu"
    return resolve_device(requested).type

"""The one place where the torch device is chosen.

Nothing else in the package calls ``torch.cuda.is_available()`` to pick a device: the command
line resolves ``--device`` here once (at argument parsing, before any work starts) and passes
the resulting device name down explicitly.

GPU detection uses PyTorch's NVML-based check (``PYTORCH_NVML_BASED_CUDA_CHECK=1``), which
does not initialise the CUDA runtime in the calling process. That keeps the main process
fork-safe, so nipype's MultiProc workers can still use the GPU after the check.
"""
from __future__ import annotations

import os

import torch

__all__ = ["DEVICE_CHOICES", "DeviceUnavailableError", "cuda_available", "resolve_device"]

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


def cuda_available() -> bool:
    """Whether at least one CUDA device is visible, without initialising CUDA.

    Returns
    -------
    bool
        ``True`` when this PyTorch build has CUDA support and a device is visible.
    """
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

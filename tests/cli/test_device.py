"""The torch device is resolved in one place (ml/device.py)."""
import pytest
import torch

from bids_dmri_ldm.ml import device as device_module
from bids_dmri_ldm.ml.device import DeviceUnavailableError, resolve_device


def test_cpu_always_works():
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_falls_back_to_cpu_without_gpu(monkeypatch):
    monkeypatch.setattr(device_module, "cuda_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_picks_cuda_when_available(monkeypatch):
    monkeypatch.setattr(device_module, "cuda_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_cuda_without_gpu_says_how_to_pass_one(monkeypatch):
    monkeypatch.setattr(device_module, "cuda_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="--gpus all") as info:
        resolve_device("cuda")
    assert "apptainer run --nv" in str(info.value)


def test_unknown_device_name():
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


def test_detection_does_not_initialise_cuda():
    device_module.cuda_available()
    assert not torch.cuda.is_initialized()  # keeps the process fork-safe for MultiProc


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_on_a_gpu_machine():
    device = resolve_device("cuda")
    assert device.type == "cuda"
    assert resolve_device("auto").type == "cuda"
    assert torch.ones(2, device=device).sum().item() == 2.0

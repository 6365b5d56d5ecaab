"""The torch device is resolved in one place (ml/device.py)."""
import subprocess
import sys
from pathlib import Path

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


def test_the_build_flag_is_read_without_importing_torch(monkeypatch):
    """Known answer: the installed PyTorch's own flag, read from its version.py while torch is
    not imported."""
    expected = torch.backends.cuda.is_built()
    monkeypatch.delitem(sys.modules, "torch")
    assert device_module.torch_built_for_gpu() is expected
    assert "torch" not in sys.modules


@pytest.mark.parametrize(("text", "built_for_gpu"), [
    ("__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\nhip: Optional[str] = None\n", False),
    ("cuda: Optional[str] = '12.8'\nhip: Optional[str] = None\n", True),
    ("cuda = None\nhip = '6.2.41133'\n", True),             # a ROCm build
    ("cuda = None\n", False),
    ("cuda = get_cuda()\n", True),                          # not a literal: unknown, torch decides
    ("__version__ = '2.13.0'\n", True),                     # no cuda field: unknown
    ("cuda: Optional[str] = None\nif cuda\n", True),          # not Python: unknown
])
def test_the_build_flag_of_each_version_file(tmp_path, monkeypatch, text, built_for_gpu):
    (tmp_path / "version.py").write_text(text)
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(device_module, "_torch_version_file", lambda: tmp_path / "version.py")
    assert device_module.torch_built_for_gpu() is built_for_gpu
    monkeypatch.setattr(device_module, "_torch_version_file", lambda: tmp_path / "missing.py")
    assert device_module.torch_built_for_gpu() is True


def test_device_types_without_a_gpu_build_answer_cpu(monkeypatch):
    monkeypatch.setattr(device_module, "torch_built_for_gpu", lambda: False)
    assert device_module.resolve_device_type("cpu") == "cpu"
    assert device_module.resolve_device_type("auto") == "cpu"
    with pytest.raises(DeviceUnavailableError, match="no CUDA support|no CUDA GPU"):
        device_module.resolve_device_type("cuda")
    monkeypatch.setattr(device_module, "cuda_available", lambda: True)
    assert device_module.resolve_device_type("auto") == "cuda"


def test_the_participant_levels_main_process_does_not_import_torch():
    """What the main process of a participant level runs before and after its workers (the
    device check, the workflow and report modules, the learned model's inspection) loads no
    torch (~1 s of CPU at every start); only ``--device auto`` with a GPU build asks torch."""
    code = (
        "import sys\n"
        "from bids_dmri_ldm.cli.values import device_type\n"
        "import bids_dmri_ldm.workflows.base, bids_dmri_ldm.workflows.dwi, bids_dmri_ldm.reports.participant\n"
        "from bids_dmri_ldm.methods.registry import inspect_model\n"
        "info = inspect_model('ldm', None, {'device': 'cpu'})\n"
        "print(device_type('cpu'), 'torch' in sys.modules, device_type('auto'), info.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.split()
    assert out[:2] == ["cpu", "False"]
    assert out[2] == ("cuda" if device_module.cuda_available() else "cpu")
    assert out[3]  # the shipped demo bundle was verified

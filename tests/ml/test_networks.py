"""Network shapes, the SR head, config validation and a seeded regression."""
import copy

import pytest
import torch

from bids_dmri_ldm.ml.modelconfig import ConfigError, load_config, validate_config
from bids_dmri_ldm.ml.networks import build_all, latent_shape


def test_shapes_of_all_networks(tiny_cfg):
    nets = build_all(tiny_cfg)
    x = torch.randn(3, 1, 16, 16, 16)
    with torch.no_grad():
        z = nets["vqvae3t"].encode_stage_2_inputs(x)
        assert z.shape == (3, *latent_shape(tiny_cfg)) == (3, 4, 4, 4, 4)
        recon, qloss = nets["vqvae3t"](x)
        assert recon.shape == x.shape and qloss.numel() == 1
        eps = nets["unet"](z, torch.tensor([1, 5, 9]), torch.tensor([0, 1, 2]))
        assert eps.shape == z.shape
        assert nets["sr"](x).shape == x.shape
        assert nets["sr"](x, out_shape=(20, 18, 16)).shape == (3, 1, 20, 18, 16)


def test_unet_attention_at_two_deepest_levels_and_class_context():
    cfg = load_config("paper")
    cfg["unet"]["channels"] = [32, 32, 32, 32]
    unet = build_all(cfg)["unet"].unet
    kinds = [type(b).__name__ for b in unet.down_blocks]
    assert kinds == ["DownBlock", "DownBlock", "CrossAttnDownBlock", "CrossAttnDownBlock"]


def test_untrained_sr_head_is_identity(tiny_cfg):
    sr = build_all(tiny_cfg)["sr"]
    x = torch.randn(2, 1, 8, 8, 8)
    assert torch.equal(sr(x), x)


def test_class_labels_change_the_prediction(tiny_cfg):
    torch.manual_seed(0)
    unet = build_all(tiny_cfg)["unet"]
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
        z = torch.randn(1, 4, 4, 4, 4).repeat(2, 1, 1, 1, 1)
        eps = unet(z, torch.tensor([10, 10]), torch.tensor([0, 1]))
    assert not torch.allclose(eps[0], eps[1])


def test_seeded_regression_of_a_tiny_vqvae(tiny_cfg):
    torch.manual_seed(0)
    vq = build_all(tiny_cfg)["vqvae3t"].eval()
    x = torch.linspace(-1, 1, 16 ** 3).view(1, 1, 16, 16, 16)
    with torch.no_grad():
        out = vq.decode(vq.encode(x))
    # stored from this implementation (MONAI 1.6.1, torch 2.13 CPU); guards silent changes
    assert out.shape == x.shape
    assert float(out.mean()) == pytest.approx(REGRESSION_MEAN, abs=1e-5)
    assert float(out.std()) == pytest.approx(REGRESSION_STD, abs=1e-5)


REGRESSION_MEAN = 0.01628371886909008
REGRESSION_STD = 0.03712860122323036


def test_builtin_configs_validate_and_bad_keys_are_refused():
    for name in ("demo", "paper"):
        assert load_config(name)["name"] == name
    cfg = load_config("demo")
    bad = copy.deepcopy(cfg)
    bad["vqvae"]["chanels"] = [8]
    with pytest.raises(ConfigError, match="unknown key.*chanels"):
        validate_config(bad)
    bad = copy.deepcopy(cfg)
    del bad["translation"]["t0"]
    with pytest.raises(ConfigError, match="missing key.*t0"):
        validate_config(bad)
    bad = copy.deepcopy(cfg)
    bad["unet"]["channels"] = [12, 16, 16]
    with pytest.raises(ConfigError, match="divisible by norm_num_groups"):
        validate_config(bad)
    bad = copy.deepcopy(cfg)
    bad["translation"]["cpu_precision"] = "fp16"
    with pytest.raises(ConfigError, match="cpu_precision must be one of"):
        validate_config(bad)
    assert load_config("paper")["translation"]["cpu_precision"] == "bf16"
    bad = copy.deepcopy(cfg)
    bad["format_version"] = 99
    with pytest.raises(ConfigError, match="format_version"):
        validate_config(bad)
    with pytest.raises(ConfigError, match="neither a file nor"):
        load_config("nonexistent")


def test_select_epoch_is_an_optional_cnn_setting_and_checked():
    cfg = load_config("cnn-demo")
    cfg["training"]["select_epoch"] = "best-validation"
    assert validate_config(cfg) is cfg
    cfg["training"]["select_epoch"] = "best"
    with pytest.raises(ConfigError, match="select_epoch must be one of \\['last', 'best-validation'\\]"):
        validate_config(cfg)
    ldm = load_config("demo")  # the ldm's stages train from the earlier stages' checkpoints
    ldm["training"]["select_epoch"] = "best-validation"
    with pytest.raises(ConfigError, match="unknown key.*select_epoch"):
        validate_config(ldm)


def test_yaml_config_is_accepted(tmp_path):
    import yaml
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(load_config("demo")))
    assert load_config(path) == load_config("demo")
    path.write_text("grid: [32, 32\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_hidden_packages_block_imports_only_inside_the_block():
    import importlib
    import sys

    from bids_dmri_ldm.ml.networks import hidden_packages

    name = "colorsys"   # a standard-library module no test imports
    sys.modules.pop(name, None)
    with hidden_packages([name, "json"]):
        with pytest.raises(ImportError):
            importlib.import_module(name)
        assert importlib.import_module("json") is sys.modules["json"]   # already imported: left alone
    assert importlib.import_module(name).hsv_to_rgb(0, 0, 1) == (1, 1, 1)
    with pytest.raises(RuntimeError), hidden_packages([name + "_never_imported"]):
        raise RuntimeError
    assert name + "_never_imported" not in sys.modules


def test_the_networks_import_monai_without_the_packages_they_do_not_use():
    """MONAI's own import would load matplotlib, pandas, scikit-learn, ... (installed here as
    dependencies of the reports and of pybids); the networks' import leaves them out, and they
    still import afterwards."""
    import subprocess
    import sys

    code = ("import sys; import bids_dmri_ldm.ml.networks as n; "
            "print(sorted(m for m in n.MONAI_UNUSED_PACKAGES if m in sys.modules)); "
            "import matplotlib, pandas, sklearn; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "ok"]
    # with another thread alive (which could be importing one of them meanwhile) nothing is hidden
    threaded = ("import sys, threading, time; threading.Thread(target=time.sleep, args=(30,), daemon=True).start(); "
                "import bids_dmri_ldm.ml.networks as n; print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", threaded], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True"]

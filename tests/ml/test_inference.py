"""translate_rish: shapes, masking, determinism, samples, overrides and provenance."""
import numpy as np
import pytest

from bids_dmri_ldm.ml.bundle import load_bundle
from bids_dmri_ldm.ml.inference import translate_rish

from .conftest import synthetic_rish


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir):
    return load_bundle(tiny_bundle_dir)


def test_translation_shapes_masking_and_determinism(bundle):
    rish, mask = synthetic_rish(3)
    pred, std, recon, prov = translate_rish(rish, mask, bundle, seed=1)
    for arr in (pred, recon):
        assert arr.shape == rish.shape and arr.dtype == np.float32
        assert np.all(arr[~mask] == 0) and np.all(arr >= 0) and np.all(np.isfinite(arr))
    assert std is None
    again = translate_rish(rish, mask, bundle, seed=1)
    assert np.array_equal(pred, again.pred_7t)
    assert prov["NoiseLevelT0"] == [30, 30, 30] and prov["DDIMSteps"] == 5
    assert prov["Method"] == "ldm" and prov["Device"] == "cpu"


def test_translation_runs_every_network_without_autograd(bundle):
    """Nothing is trained at the participant level: no network call records an autograd graph
    (the 3T encoder's did, before 2026-12-02)."""
    import torch

    grad_enabled = {}
    hooks = [layer.register_forward_pre_hook(  # on the convolutions: the VQ-VAEs are called through encode/decode
        lambda module, args, name=name: grad_enabled.setdefault(name, set()).add(torch.is_grad_enabled()))
        for name, network in bundle.networks.items() for layer in network.modules()
        if isinstance(layer, torch.nn.Conv3d)]
    try:
        rish, mask = synthetic_rish(3)
        translate_rish(rish, mask, bundle, seed=1)
    finally:
        for hook in hooks:
            hook.remove()
    assert {"vqvae3t", "vqvae7t", "unet", "sr"} <= set(grad_enabled)
    assert all(states == {False} for states in grad_enabled.values()), grad_enabled


def test_samples_give_mean_and_std_and_overrides_are_recorded(bundle):
    rish, mask = synthetic_rish(4)
    res = translate_rish(rish, mask, bundle, seed=2, num_samples=3, t0=[20, 25, 30],
                         guidance=0.5, ddim_steps=4)
    assert res.std.shape == rish.shape and res.std[mask].mean() > 0
    assert np.all(res.std[~mask] == 0)
    assert res.provenance["NoiseLevelT0"] == [20, 25, 30]
    assert res.provenance["GuidanceScale"] == [0.5] * 3
    assert res.provenance["NumSamples"] == 3 and res.provenance["SamplingEta"] > 0
    same = translate_rish(rish, mask, bundle, seed=2, num_samples=3, t0=[20, 25, 30],
                          guidance=0.5, ddim_steps=4, max_batch=3)  # other batching, same seeds
    np.testing.assert_allclose(same.pred_7t, res.pred_7t, rtol=1e-5, atol=1e-6)


def test_linear_gains_scale_the_outputs_per_order(tiny_bundle_dir):
    """translation.gain_7t / gain_3t multiply the predicted 7T and the round-trip 3T RISH."""
    rish, mask = synthetic_rish(6)
    plain = translate_rish(rish, mask, load_bundle(tiny_bundle_dir), seed=0)
    assert plain.provenance["LinearGain7T"] == [1.0] * 3
    gained_bundle = load_bundle(tiny_bundle_dir)
    gained_bundle.config["translation"].update(gain_7t=[2.0, 0.5, 3.0], gain_3t=[0.25, 1.0, 4.0])
    gained = translate_rish(rish, mask, gained_bundle, seed=0)
    np.testing.assert_allclose(gained.pred_7t, plain.pred_7t * np.float32([2.0, 0.5, 3.0]), rtol=1e-5)
    np.testing.assert_allclose(gained.recon_3t, plain.recon_3t * np.float32([0.25, 1.0, 4.0]), rtol=1e-5)
    assert gained.provenance["LinearGain3T"] == [0.25, 1.0, 4.0]
    gained_bundle.config["translation"]["gain_7t"] = [1.0, 2.0]
    with pytest.raises(ValueError, match="gain_7t needs"):
        translate_rish(rish, mask, gained_bundle)


def test_bad_inputs_are_refused(bundle):
    rish, mask = synthetic_rish(5)
    with pytest.raises(ValueError, match="rish_3t must be"):
        translate_rish(rish[..., :2], mask, bundle)
    with pytest.raises(ValueError, match="one per RISH order"):
        translate_rish(rish, mask, bundle, t0=[10, 20])
    with pytest.raises(ValueError, match="mask is empty"):
        translate_rish(rish, np.zeros_like(mask), bundle)


def test_precision_names_the_autocast_dtype_of_each_device():
    import torch

    from bids_dmri_ldm.ml.inference import mixed_precision_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert mixed_precision_dtype(cpu, "auto") is None and mixed_precision_dtype(cpu, "fp32") is None
    assert mixed_precision_dtype(cpu, "bf16") is torch.bfloat16
    assert mixed_precision_dtype(cuda, "fp32") is None and mixed_precision_dtype(cuda, "bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        mixed_precision_dtype(cpu, "fp16")


def test_cpu_bfloat16_agrees_with_float32_and_says_so(bundle):
    """--precision bf16 on the CPU: the same translation within bfloat16 rounding (a relative
    difference of a few 1e-3 per step, accumulated over the DDIM steps), recorded in provenance."""
    rish, mask = synthetic_rish(6)
    fp32 = translate_rish(rish, mask, bundle, seed=0)
    bf16 = translate_rish(rish, mask, bundle, seed=0, precision="bf16")
    assert (fp32.provenance["Precision"], fp32.provenance["MixedPrecision"]) == ("float32", False)
    assert (bf16.provenance["Precision"], bf16.provenance["MixedPrecision"]) == ("bfloat16 autocast", True)
    rel = np.abs(bf16.pred_7t - fp32.pred_7t)[mask].mean() / np.abs(fp32.pred_7t[mask]).mean()
    assert 0 < rel < 0.05
    assert bf16.pred_7t.dtype == np.float32


def test_native_bfloat16_is_read_from_the_cpu_flags(tmp_path):
    from bids_dmri_ldm.ml.inference import cpu_computes_bfloat16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16\n")
    assert cpu_computes_bfloat16(str(info)) is True
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_tile amx_bf16\n")
    assert cpu_computes_bfloat16(str(info)) is True
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl\n")  # emulated only
    assert cpu_computes_bfloat16(str(info)) is False
    assert cpu_computes_bfloat16(str(tmp_path / "absent")) is False


def test_auto_precision_on_the_cpu_is_the_bundles_choice_where_the_cpu_has_bfloat16(bundle, monkeypatch):
    """``auto`` on the CPU: the config's translation.cpu_precision, only with native bfloat16;
    an explicit choice and the GPU's ``auto`` are left alone; the sidecar says what ran."""
    import copy
    import dataclasses

    import torch

    from bids_dmri_ldm.ml import inference

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cfg = copy.deepcopy(bundle.config)
    cfg["translation"]["cpu_precision"] = "bf16"
    wants_bf16 = dataclasses.replace(bundle, config=cfg)
    rish, mask = synthetic_rish(6)

    monkeypatch.setattr(inference, "cpu_computes_bfloat16", lambda: True)
    assert inference.resolve_precision(cfg, cpu) == "bf16"
    assert inference.resolve_precision(bundle.config, cpu) == "fp32"      # the default: float32
    assert inference.resolve_precision(cfg, cpu, "fp32") == "fp32"
    assert inference.resolve_precision(cfg, cuda) == "auto"
    auto = translate_rish(rish, mask, wants_bf16, seed=0)
    asked = translate_rish(rish, mask, bundle, seed=0, precision="bf16")
    assert (auto.provenance["Precision"], auto.provenance["PrecisionOption"]) == ("bfloat16 autocast", "auto")
    assert np.array_equal(auto.pred_7t, asked.pred_7t)

    monkeypatch.setattr(inference, "cpu_computes_bfloat16", lambda: False)
    assert inference.resolve_precision(cfg, cpu) == "fp32"
    plain = translate_rish(rish, mask, wants_bf16, seed=0)
    assert (plain.provenance["Precision"], plain.provenance["PrecisionOption"]) == ("float32", "auto")
    assert np.array_equal(plain.pred_7t, translate_rish(rish, mask, bundle, seed=0).pred_7t)
    with pytest.raises(ValueError, match="precision must be one of"):
        inference.resolve_precision(cfg, cpu, "fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mixed_precision_agrees_with_cpu(tiny_bundle_dir):
    rish, mask = synthetic_rish(6)
    cpu = translate_rish(rish, mask, load_bundle(tiny_bundle_dir), seed=0)
    gpu = translate_rish(rish, mask, load_bundle(tiny_bundle_dir, "cuda"), device="cuda", seed=0)
    assert gpu.provenance["MixedPrecision"] is True
    rel = np.abs(gpu.pred_7t - cpu.pred_7t)[mask].mean() / cpu.pred_7t[mask].mean()
    assert rel < 0.05

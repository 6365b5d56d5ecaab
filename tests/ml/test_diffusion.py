"""Diffusion maths: schedules, forward process, guidance (Eq. 10), DDIM inversion/sampling (Eq. 8)."""
import numpy as np
import pytest
import torch

from bids_dmri_ldm.ml.diffusion import LatentDiffusion, beta_schedule
from bids_dmri_ldm.ml.modelconfig import CLASS_NULL
from bids_dmri_ldm.ml.networks import build_unet


def test_schedules_match_their_definitions():
    lin = beta_schedule("linear", 1000, 1e-4, 0.02)
    assert lin.dtype == torch.float64
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    scaled = beta_schedule("scaled_linear", 1000, 0.0015, 0.0195)
    np.testing.assert_allclose(scaled.sqrt().diff().numpy(), (0.0195 ** .5 - 0.0015 ** .5) / 999, rtol=1e-9)
    d = LatentDiffusion(1000, "scaled_linear", 0.0015, 0.0195)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), np.cumprod(1 - scaled.numpy()), rtol=1e-12)
    assert d.alpha_bar(torch.tensor([-1]), torch.zeros(1)).item() == 1.0
    with pytest.raises(ValueError, match="unknown beta schedule"):
        beta_schedule("cosine", 10, 0.1, 0.2)


def test_add_noise_has_the_ddpm_marginal_statistics():
    d = LatentDiffusion(1000, "linear", 1e-4, 0.02)
    t = torch.tensor([10, 500, 999])
    x0 = torch.full((3, 200_000), 2.0)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    xt = d.add_noise(x0, noise, t)
    a = d.alphas_cumprod[t].numpy()
    np.testing.assert_allclose(xt.mean(1).numpy(), 2.0 * np.sqrt(a), atol=0.01)
    np.testing.assert_allclose(xt.var(1).numpy(), 1 - a, rtol=0.02, atol=1e-4)


def test_training_loss_is_zero_for_the_true_noise():
    d = LatentDiffusion(100, "linear", 1e-4, 0.02)
    noise = torch.randn(2, 3, 4)
    oracle = lambda x, t, c: noise
    assert d.training_loss(oracle, torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long), noise,
                           torch.tensor([5, 50])).item() == 0.0


def test_guidance_follows_eq10():
    # eps(x, c) = c + 1 so the conditional (class 0) gives 1 and the null (class 2) gives 3
    model = lambda x, t, c: (c.float() + 1).view(-1, 1) * torch.ones_like(x)
    x = torch.zeros(2, 5)
    labels = torch.zeros(2, dtype=torch.long)
    eps = LatentDiffusion.guided_eps(model, x, torch.tensor([3, 3]), labels, torch.tensor([0.0, 2.0]))
    np.testing.assert_allclose(eps[0].numpy(), 1.0)       # omega 0: conditional only
    np.testing.assert_allclose(eps[1].numpy(), 3 * 1 - 2 * 3)  # (1 + w) eps_c - w eps_null
    assert CLASS_NULL == 2


def test_guidance_runs_the_null_pass_only_for_entries_that_use_it():
    """Orders with omega = 0 cost one network pass, not two: the batch the network sees holds the
    N conditional entries plus one null entry per omega != 0, and each entry's eps is Eq. 10."""
    seen = []

    def model(x, t, c):
        seen.append(c.tolist())
        return (c.float() + 1).view(-1, 1) * (1 + x)

    x = torch.arange(4.0).view(4, 1) * torch.ones(4, 3)
    labels = torch.ones(4, dtype=torch.long)
    w = torch.tensor([3.0, 0.0, 0.5, 0.0])
    eps = LatentDiffusion.guided_eps(model, x, torch.full((4,), 7), labels, w)
    assert seen == [[1, 1, 1, 1, CLASS_NULL, CLASS_NULL]]
    cond, null = 2 * (1 + x), 3 * (1 + x)
    expected = (1 + w.view(-1, 1)) * cond - w.view(-1, 1) * null
    torch.testing.assert_close(eps, expected)
    seen.clear()
    LatentDiffusion.guided_eps(model, x, torch.full((4,), 7), labels, torch.zeros(4))
    assert seen == [[1, 1, 1, 1]]


def test_ddim_timesteps_are_explicit_and_end_at_t0():
    tau = LatentDiffusion.ddim_timesteps(torch.tensor([249, 999]), 50)
    assert tau.shape == (2, 51)
    assert tau[:, 0].tolist() == [-1, -1] and tau[:, -1].tolist() == [249, 999]
    assert torch.all(tau.diff(dim=1) > 0)
    with pytest.raises(ValueError):
        LatentDiffusion.ddim_timesteps(torch.tensor([3]), 10)


def _random_unet(cfg):
    torch.manual_seed(0)
    unet = build_unet(cfg).eval()
    with torch.no_grad():  # MONAI zero-initialises the output conv; make eps non-trivial
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def test_inversion_then_sampling_returns_the_latent(tiny_cfg):
    tiny_cfg["diffusion"]["num_train_timesteps"] = 1000
    d = LatentDiffusion.from_config(tiny_cfg)
    unet = _random_unet(tiny_cfg)
    x0 = torch.randn(3, 4, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(3, dtype=torch.long)
    t0 = torch.tensor([250, 400, 600])   # one noise level per RISH order, batched
    errors = []
    for steps in (5, 20):
        xt = d.invert(unet, x0, t0, steps, labels)
        assert (xt - x0).pow(2).mean().sqrt() > 0.3   # really moved toward noise
        back = d.sample(unet, xt, t0, steps, labels, torch.zeros(3))
        errors.append((back - x0).pow(2).mean(dim=(1, 2, 3, 4)).sqrt())
    assert torch.all(errors[1] < 0.3 * errors[0])       # error shrinks ~1/steps
    assert errors[1][0] < 0.01 and errors[1].max() < 0.1


def test_stochastic_sampling_is_seeded(tiny_cfg):
    d = LatentDiffusion.from_config(tiny_cfg)
    unet = _random_unet(tiny_cfg)
    x = torch.randn(2, 4, 4, 4, 4)
    args = (unet, x, torch.tensor([30, 30]), 5, torch.ones(2, dtype=torch.long), torch.ones(2))
    a = d.sample(*args, eta=1.0, generator=torch.Generator().manual_seed(3))
    b = d.sample(*args, eta=1.0, generator=torch.Generator().manual_seed(3))
    c = d.sample(*args, eta=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_batched_orders_and_guidance_match_one_forward_per_branch(tiny_cfg):
    """The translation batches the orders and both CFG branches (conditional + null) into one
    UNet call per step; the latents equal those of one call per order and per branch."""
    d = LatentDiffusion.from_config(tiny_cfg)
    unet = _random_unet(tiny_cfg)
    x0 = torch.randn(3, 4, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    t0 = torch.tensor([20, 40, 60])
    w = torch.tensor([0.0, 1.0, 3.0])  # one omega per order; 0 still runs the null branch when batched
    invert_labels, target_labels = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
    batched = d.sample(unet, d.invert(unet, x0, t0, 6, invert_labels), t0, 6, target_labels, w)

    def one_at_a_time(i):
        x = x0[i:i + 1]
        tau = LatentDiffusion.ddim_timesteps(t0[i:i + 1], 6)
        with torch.no_grad():
            for k in range(1, 7):
                eps = unet(x, tau[:, k], invert_labels[i:i + 1]).float()
                x = d.ddim_update(x, eps, tau[:, k - 1], tau[:, k])
            for k in range(6, 0, -1):
                eps_c = unet(x, tau[:, k], target_labels[i:i + 1]).float()
                eps_u = unet(x, tau[:, k], torch.full((1,), CLASS_NULL)).float()
                eps = (1 + w[i]) * eps_c - w[i] * eps_u
                x = d.ddim_update(x, eps, tau[:, k], tau[:, k - 1])
        return x

    reference = torch.cat([one_at_a_time(i) for i in range(3)])
    assert (reference - x0).abs().max() > 1e-3  # the guidance moved the latents
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5)

"""Tiny configs and synthetic RISH volumes for the ml tests (CPU, seconds)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bids_dmri_ldm.ml.modelconfig import load_config, validate_config

torch.set_num_threads(1)


def tiny_config() -> dict:
    """The demo config shrunk to a 16^3 grid and channels of 8 (valid training config)."""
    cfg = copy.deepcopy(load_config("demo"))
    cfg["name"] = "tiny"
    cfg["grid"] = [16, 16, 16]
    cfg["vqvae"].update(channels=[8, 8], num_res_channels=[8, 8], embedding_dim=4, num_embeddings=16)
    cfg["unet"].update(channels=[8, 8], norm_num_groups=4, num_head_channels=4, class_embedding_dim=8)
    cfg["sr"].update(channels=4, num_res_blocks=1)
    cfg["diffusion"]["num_train_timesteps"] = 100
    cfg["translation"].update(t0=[30, 30, 30], ddim_steps=5, crop_margin=1)
    cfg["training"].update(batch_size=4, latent_batch_size=4, sr_ddim_steps=3,
                           calibrate_t0=[10, 30], calibrate_guidance=[0.0, 2.0],
                           epochs={"vqvae3t": 1, "vqvae7t": 1, "ldm": 1, "sr": 1})
    return validate_config(cfg)


@pytest.fixture
def tiny_cfg() -> dict:
    return tiny_config()


def synthetic_rish(seed: int, shape=(18, 20, 16), ratio=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Smooth positive RISH_0/2/4 maps inside an ellipsoid brain; ``ratio`` scales each order."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r2 = sum(g ** 2 for g in grids)
    mask = r2 < 0.8
    wave = 1 + 0.3 * np.sin(3 * grids[0] + rng.uniform(0, 6)) * np.cos(2 * grids[1])
    base = np.stack([3.0 * wave, 0.2 * wave ** 2, 0.03 * wave ** 3], -1)
    base = base * np.asarray(ratio) * (1 + 0.05 * rng.standard_normal(base.shape))
    base[~mask] = 0
    return base.astype(np.float32), mask


def with_affine(rish_mask: tuple[np.ndarray, np.ndarray], voxel_mm: float = 2.0) -> tuple:
    """``(rish, mask, affine)`` with an axis-aligned RAS affine of ``voxel_mm`` centred at 0."""
    rish, mask = rish_mask
    affine = np.diag([voxel_mm] * 3 + [1.0])
    affine[:3, 3] = -voxel_mm * (np.asarray(mask.shape) - 1) / 2
    return rish, mask, affine


@pytest.fixture
def rish_pairs():
    """Four paired participants (7T = 3T x (0.85, 0.75, 0.7), same grid) plus one unpaired 3T,
    as ``{label: (rish, mask, affine)}``."""
    r3 = {f"p{i}": with_affine(synthetic_rish(i)) for i in range(5)}
    r7 = {f"p{i}": with_affine(synthetic_rish(i, ratio=(0.85, 0.75, 0.7))) for i in range(4)}
    return r3, r7


def tiny_bundle_config(cfg: dict) -> dict:
    """A bundle config from the tiny training config (normalisation fitted on synthetic data)."""
    from bids_dmri_ldm.ml.normalise import fit_normalisation

    vols, masks = zip(*(synthetic_rish(i) for i in range(2)))
    return dict(copy.deepcopy(cfg), normalisation=fit_normalisation(vols, masks, cfg["orders"]),
                latent_scale=1.0, training_data={"n_3t": 2}, software={"torch": torch.__version__},
                created="2026-01-01T00:00:00+00:00")


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory):
    """An untrained but complete tiny bundle (written once per session)."""
    from bids_dmri_ldm.ml.bundle import model_card, save_bundle
    from bids_dmri_ldm.ml.networks import build_all

    cfg = tiny_bundle_config(tiny_config())
    torch.manual_seed(0)
    nets = build_all(cfg)
    with torch.no_grad():  # make the UNet non-trivial (MONAI zero-initialises its output conv)
        for p in nets["unet"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_bundle(tmp_path_factory.mktemp("bundle") / "tiny", cfg, nets, model_card(cfg))

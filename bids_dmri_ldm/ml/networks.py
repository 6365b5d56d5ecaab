"""Network builders (MONAI) for the latent diffusion model of Zhu et al. (MICCAI 2024).

Design decision: **one channel per RISH order.**  Every RISH order l is an
independent single-channel volume ``(N, 1, X, Y, Z)``; the three orders of a
participant travel as three entries of the batch.  This is what allows the
paper's per-order noise level t0 and guidance scale omega (each batch entry
carries its own timestep) and keeps one set of weights for all orders.

Builders take the validated config dict (see ``ml/modelconfig.py``).
"""
from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .modelconfig import CLASS_NAMES

MONAI_UNUSED_PACKAGES = ("matplotlib", "pandas", "sklearn", "h5py", "requests", "jsonschema", "scipy.signal")
"""Packages that ``import monai`` loads when they are installed and the networks never use: MONAI
imports every subpackage, and their optional imports pull these in (matplotlib for
``monai.utils.jupyter_utils``, pandas for ``monai.utils.profiling``, scikit-learn for
``monai.metrics``, h5py, requests and jsonschema for ``monai.apps``/``monai.bundle``, SciPy's
signal processing, with its statistics, for ``monai.data.ultrasound_confidence_map``).  Measured
on 2 cores (2026-12-01): the networks' import, after the pipeline's own modules, took 2.5 s of
CPU, 1.2 s with the first six hidden, 0.45-0.6 s with all seven; it runs in the participant
level's method worker beside the first steps."""


@contextlib.contextmanager
def hidden_packages(names: Sequence[str]) -> Iterator[None]:
    """Within the block, ``import name`` raises ImportError for each of ``names`` not imported yet
    (a ``None`` entry in ``sys.modules``, Python's own way to block an import); afterwards they
    import as usual.  Packages already imported are left alone."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def _monai_nets():
    """``monai.networks.nets``, imported without :data:`MONAI_UNUSED_PACKAGES` (MONAI treats an
    optional package that fails to import as absent; a MONAI that needs one outright gets it).

    Only in a process with one thread (the participant level's method worker): ``sys.modules`` is
    shared, and another thread importing one of them meanwhile would fail."""
    hidden = MONAI_UNUSED_PACKAGES if threading.active_count() == 1 else ()
    try:
        with hidden_packages(hidden):
            from monai.networks import nets
    except ImportError:
        from monai.networks import nets
    return nets


_nets = _monai_nets()
VQVAE, DiffusionModelUNet, UNet = _nets.VQVAE, _nets.DiffusionModelUNet, _nets.UNet


def build_vqvae(cfg: dict[str, Any]) -> VQVAE:
    """3D single-channel VQ-VAE (paper: embedding dim 32, 256 codebook entries).

    Each level of ``vqvae.channels`` halves the grid (stride-2, kernel-4 convs),
    so the latent grid is ``grid / 2**len(channels)`` with ``embedding_dim``
    channels.  The same builder serves the 3T and the 7T autoencoder.
    """
    c = cfg["vqvae"]
    n_levels = len(c["channels"])
    return VQVAE(
        spatial_dims=3, in_channels=1, out_channels=1,
        channels=tuple(c["channels"]), num_res_layers=c["num_res_layers"],
        num_res_channels=tuple(c["num_res_channels"]),
        downsample_parameters=((2, 4, 1, 1),) * n_levels,
        upsample_parameters=((2, 4, 1, 1, 0),) * n_levels,
        num_embeddings=c["num_embeddings"], embedding_dim=c["embedding_dim"],
        commitment_cost=c["commitment_cost"], decay=c["decay"],
    )


class ConditionalUNet(nn.Module):
    """eps-prediction UNet conditioned on the field-strength class by cross-attention.

    The class label {3T=0, 7T=1, null=2} goes through a learned embedding
    tau_theta(c) (``nn.Embedding``) to a context of shape ``(N, 1, D)`` used as the
    keys and values of the cross-attention layers (paper Eq. 9).  Attention
    (self + cross) is active at the two deepest UNet levels.

    Parameters
    ----------
    unet : DiffusionModelUNet
    class_embedding_dim : int
        D, the cross-attention context size.
    """

    def __init__(self, unet: DiffusionModelUNet, class_embedding_dim: int):
        super().__init__()
        self.unet = unet
        self.class_embedding = nn.Embedding(len(CLASS_NAMES), class_embedding_dim)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predict the noise eps_theta(x_t, t, c).

        Parameters
        ----------
        x : (N, C, x, y, z) tensor, noisy latents.
        timesteps : (N,) long tensor, diffusion step of every batch entry.
        labels : (N,) long tensor of class indices (0 3T, 1 7T, 2 null).
        """
        context = self.class_embedding(labels).unsqueeze(1)  # (N, 1, D)
        return self.unet(x, timesteps=timesteps, context=context.to(x.dtype))


def build_unet(cfg: dict[str, Any]) -> ConditionalUNet:
    """Latent diffusion UNet; in/out channels = VQ-VAE embedding dim."""
    u = cfg["unet"]
    n_levels = len(u["channels"])
    attention = tuple(i >= n_levels - 2 for i in range(n_levels))
    latent_channels = cfg["vqvae"]["embedding_dim"]
    unet = DiffusionModelUNet(
        spatial_dims=3, in_channels=latent_channels, out_channels=latent_channels,
        num_res_blocks=u["num_res_blocks"], channels=tuple(u["channels"]),
        attention_levels=attention, norm_num_groups=u["norm_num_groups"],
        num_head_channels=u["num_head_channels"], with_conditioning=True,
        cross_attention_dim=u["class_embedding_dim"],
    )
    return ConditionalUNet(unet, u["class_embedding_dim"])


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class SuperResolutionHead(nn.Module):
    """Super-resolution module after the 7T decoder (paper, Sec. 2.3).

    conv -> residual blocks -> conv, added to the (optionally trilinearly
    upsampled) input, so an untrained head starts close to the identity.

    Parameters
    ----------
    channels : int
        Feature channels inside the head.
    num_res_blocks : int
        Residual blocks between the two convolutions.
    """

    def __init__(self, channels: int, num_res_blocks: int):
        super().__init__()
        self.conv_in = nn.Conv3d(1, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[_ResBlock(channels) for _ in range(num_res_blocks)])
        self.conv_out = nn.Conv3d(channels, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, out_shape: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Map decoded 7T volumes ``(N, 1, X, Y, Z)`` to ``(N, 1, *out_shape)``."""
        if out_shape is not None and tuple(out_shape) != tuple(x.shape[2:]):
            x = F.interpolate(x, size=tuple(out_shape), mode="trilinear", align_corners=False)
        return x + self.conv_out(self.blocks(self.conv_in(x)))


def build_sr_head(cfg: dict[str, Any]) -> SuperResolutionHead:
    """Super-resolution head from ``cfg['sr']``."""
    return SuperResolutionHead(cfg["sr"]["channels"], cfg["sr"]["num_res_blocks"])


class ResidualRishCNN(nn.Module):
    """The cnn baseline: a MONAI 3D UNet predicting the change of normalised log-RISH.

    Input and output ``(N, n_orders, X, Y, Z)``: all RISH orders of a scan as channels (normalised
    log-RISH, :mod:`.normalise`); output = input + UNet(input), so an untrained network starts at
    the identity.  No normalisation layers: a per-image normalisation would remove the absolute
    RISH level that tells tissue types (and field effects) apart.
    """

    def __init__(self, n_orders: int, channels: tuple[int, ...], strides: tuple[int, ...],
                 num_res_units: int):
        super().__init__()
        self.unet = UNet(spatial_dims=3, in_channels=n_orders, out_channels=n_orders,
                         channels=tuple(channels), strides=tuple(strides), num_res_units=num_res_units,
                         norm=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.unet(x)


def build_cnn(cfg: dict[str, Any]) -> ResidualRishCNN:
    """The cnn baseline network from ``cfg['cnn']`` (``method: "cnn"`` configs)."""
    c = cfg["cnn"]
    return ResidualRishCNN(len(cfg["orders"]), tuple(c["channels"]), tuple(c["strides"]), c["num_res_units"])


def build_all(cfg: dict[str, Any]) -> dict[str, nn.Module]:
    """All networks of a bundle, keyed by their weight-file stem: the four of the ldm, or the
    one of the cnn baseline (``cfg["method"] == "cnn"``)."""
    if cfg.get("method", "ldm") == "cnn":
        return {"cnn": build_cnn(cfg)}
    return {"vqvae3t": build_vqvae(cfg), "vqvae7t": build_vqvae(cfg),
            "unet": build_unet(cfg), "sr": build_sr_head(cfg)}


def latent_shape(cfg: dict[str, Any]) -> tuple[int, int, int, int]:
    """(C, x, y, z) of the VQ-VAE latent for the configured grid."""
    factor = 2 ** len(cfg["vqvae"]["channels"])
    return (cfg["vqvae"]["embedding_dim"], *(int(g) // factor for g in cfg["grid"]))

"""All diffusion mathematics of the latent diffusion model, in one readable class.

Notation follows Zhu et al. (MICCAI 2024) and Song et al. (DDIM, ICLR 2021):
``alpha_bar_t = prod_{s<=t} (1 - beta_s)``; the state "t = -1" is the clean
latent (``alpha_bar = 1``).

Why not MONAI's ``DDIMScheduler``: in MONAI 1.6 its ``step``/``reversed_step``
use a fixed stride T // n that disagrees with the linspace timesteps of
``set_timesteps`` (wrong previous timestep on 19 of 49 steps at n = 50, an
IndexError at t = 999) and ``clip_sample=True`` by default ruins the inversion
of latents.  Here every step is written with an explicit (t, t_prev) pair and
nothing is clipped, and every batch entry may carry its own noise level t0
(one per RISH order).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn import functional as F

from .modelconfig import CLASS_NULL

#: eps-model signature: (x_t (N,C,...), t (N,) long, labels (N,) long) -> eps (N,C,...)
EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def beta_schedule(kind: str, num_train_timesteps: int, beta_start: float,
                  beta_end: float) -> torch.Tensor:
    """Noise schedule beta_t, float64, shape (T,).

    ``linear``: linspace(beta_start, beta_end); ``scaled_linear``: the square of
    linspace(sqrt(beta_start), sqrt(beta_end)) (latent diffusion's schedule).
    """
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                              dtype=torch.float64) ** 2
    raise ValueError(f"unknown beta schedule {kind!r}; use 'linear' or 'scaled_linear'")


class LatentDiffusion:
    """DDPM forward process, eps-loss, classifier-free guidance, DDIM inversion and sampling.

    Parameters
    ----------
    num_train_timesteps : int
        T, number of diffusion steps used in training.
    schedule, beta_start, beta_end
        See :func:`beta_schedule`.
    """

    def __init__(self, num_train_timesteps: int = 1000, schedule: str = "scaled_linear",
                 beta_start: float = 0.0015, beta_end: float = 0.0195):
        self.num_train_timesteps = int(num_train_timesteps)
        self.betas = beta_schedule(schedule, self.num_train_timesteps, beta_start, beta_end)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # float64 (T,)
        # index 0 is the clean state t = -1 (alpha_bar = 1), index t + 1 is step t
        self._alpha_bar_ext = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> LatentDiffusion:
        d = cfg["diffusion"]
        return cls(d["num_train_timesteps"], d["schedule"], d["beta_start"], d["beta_end"])

    # ------------------------------------------------------------------ helpers
    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t for integer steps ``t`` (N,) (t = -1 gives 1), shaped to broadcast on ``like``."""
        a = self._alpha_bar_ext.to(like.device)[t.long() + 1].to(torch.float32)
        return a.view(-1, *([1] * (like.ndim - 1)))

    # ------------------------------------------------------- forward process
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """DDPM forward process q(x_t | x_0) (paper Eq. 4-5).

        x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
        """
        a = self.alpha_bar(t, x0)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    def training_loss(self, model: EpsModel, x0: torch.Tensor, labels: torch.Tensor,
                      noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps-prediction loss || eps - eps_theta(x_t, t, c) ||^2 (paper Eq. 7), batch mean."""
        pred = model(self.add_noise(x0, noise, t), t, labels)
        return F.mse_loss(pred.float(), noise)

    # ---------------------------------------------------- guidance (Eq. 10)
    @staticmethod
    def guided_eps(model: EpsModel, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                   guidance: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance eps = (1 + w) eps(x, c) - w eps(x, null) (paper Eq. 10).

        ``guidance`` is the paper's omega, one value per batch entry (N,);
        MONAI's inferers call ``cfg = omega + 1``.  The conditional pass and the null
        pass of the entries with omega != 0 run as one batch; an entry with omega = 0 needs no
        null pass (its eps is the conditional one), so none is run for it.
        """
        guided = guidance != 0
        if not torch.any(guided):
            return model(x, t, labels).float()
        n = len(x)
        idx = guided.nonzero().flatten().to(x.device)
        null = torch.full_like(labels[idx], CLASS_NULL)
        eps = model(torch.cat([x, x[idx]]), torch.cat([t, t[idx]]), torch.cat([labels, null])).float()
        eps_c, eps_u = eps[:n], eps[n:]
        w = guidance[idx].to(eps_c).view(-1, *([1] * (x.ndim - 1)))
        out = eps_c.clone()
        out[idx] = (1.0 + w) * eps_c[idx] - w * eps_u
        return out

    # ----------------------------------------------------------------- DDIM
    @staticmethod
    def ddim_timesteps(t0: torch.Tensor, num_steps: int) -> torch.Tensor:
        """Integer DDIM grid from the clean state to t0, one row per batch entry.

        Returns ``tau`` of shape (N, num_steps + 1), ``tau[:, 0] = -1`` (clean),
        ``tau[:, -1] = t0``, evenly spaced in between.  Step k of the inversion
        goes tau_{k-1} -> tau_k, step k of the sampling tau_k -> tau_{k-1}, both
        evaluating eps_theta at timestep tau_k, so sampling retraces the inversion.
        """
        t0 = t0.long().view(-1, 1)
        if num_steps < 1 or torch.any(t0 + 1 < num_steps):
            raise ValueError(f"need 1 <= ddim_steps <= t0 + 1, got {num_steps} for t0={t0.flatten().tolist()}")
        k = torch.arange(num_steps + 1, dtype=torch.float64).view(1, -1)
        return torch.round(k * (t0 + 1).double() / num_steps).long() - 1

    def ddim_update(self, x: torch.Tensor, eps: torch.Tensor, t_from: torch.Tensor,
                    t_to: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM move of x from step t_from to t_to (either direction; Eq. 8).

        x_0^ = (x - sqrt(1 - a_from) eps) / sqrt(a_from);
        x'   = sqrt(a_to) x_0^ + sqrt(1 - a_to) eps.   No clipping.
        """
        a_from, a_to = self.alpha_bar(t_from, x), self.alpha_bar(t_to, x)
        x0_hat = (x - (1.0 - a_from).sqrt() * eps) / a_from.sqrt()
        return a_to.sqrt() * x0_hat + (1.0 - a_to).sqrt() * eps

    @torch.no_grad()
    def invert(self, model: EpsModel, x0: torch.Tensor, t0: torch.Tensor, num_steps: int,
               labels: torch.Tensor, guidance: torch.Tensor | None = None,
               progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Deterministic DDIM inversion x_0 -> x_{t0} (paper Eq. 8), float32 state.

        Parameters
        ----------
        x0 : (N, C, x, y, z) clean latents.
        t0 : (N,) target noise level per batch entry.
        labels : (N,) class used during inversion.
        guidance : (N,) omega during inversion (default 0: plain conditional eps).
        """
        tau = self.ddim_timesteps(t0, num_steps).to(x0.device)
        w = torch.zeros(len(x0)) if guidance is None else guidance
        x = x0.float()
        for k in range(1, num_steps + 1):
            eps = self.guided_eps(model, x, tau[:, k], labels, w.to(x.device))
            x = self.ddim_update(x, eps, tau[:, k - 1], tau[:, k])
            if progress:
                progress(1)
        return x

    @torch.no_grad()
    def sample(self, model: EpsModel, x_t0: torch.Tensor, t0: torch.Tensor, num_steps: int,
               labels: torch.Tensor, guidance: torch.Tensor, eta: float = 0.0,
               generator: torch.Generator | Sequence[torch.Generator] | None = None,
               progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Guided DDIM sampling x_{t0} -> x_0 (Song et al. Eq. 12; guidance Eq. 10).

        With ``eta = 0`` (default) the sampling is deterministic and retraces
        :meth:`invert`.  ``eta > 0`` adds seeded noise of standard deviation
        sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev) per step
        (used to draw several samples for an uncertainty map); the noise is drawn
        on the CPU from ``generator`` so a seed gives the same result on any device;
        a sequence of generators (one per batch entry) makes each entry's noise
        independent of how entries are batched together.
        """
        tau = self.ddim_timesteps(t0, num_steps).to(x_t0.device)
        x = x_t0.float()
        for k in range(num_steps, 0, -1):
            t, t_prev = tau[:, k], tau[:, k - 1]
            eps = self.guided_eps(model, x, t, labels, guidance.to(x.device))
            if eta == 0:
                x = self.ddim_update(x, eps, t, t_prev)
            else:
                a_t, a_prev = self.alpha_bar(t, x), self.alpha_bar(t_prev, x)
                sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
                x0_hat = (x - (1.0 - a_t).sqrt() * eps) / a_t.sqrt()
                z = _noise_like(x, generator)
                x = (a_prev.sqrt() * x0_hat + (1.0 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
                     + sigma * z)
            if progress:
                progress(1)
        return x


def _noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn on the CPU (one generator or one per entry)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32)
                        for g in generator]).to(x.device)

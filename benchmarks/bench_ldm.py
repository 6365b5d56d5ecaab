#!/usr/bin/env python
"""Benchmark of the LDM translation and training steps (measured, not a timed test).

Inference: one participant (HCP-like 3T grid 145 x 174 x 145, three RISH orders)
through ``translate_rish`` with guidance on.  On a slow CPU the full 50-step run
can be replaced by an honest extrapolation (``--extrapolate``): the whole pipeline is
timed at 1 step, one inversion step + one guided sampling step of the UNet is timed
separately (median of --repeats), and time(50) = time(1) + 49 x step-pair time
(every DDIM step costs the same).  Training: one optimiser step of each network
at the config's grid.  Peak memory: process max RSS (CPU) and
``torch.cuda.max_memory_allocated`` (GPU).  Weights are random: timing does not
depend on them.

    python benchmarks/bench_ldm.py --device cpu --steps 50 --extrapolate
    python benchmarks/bench_ldm.py --device cuda --steps 50          # full run on a GPU
    python benchmarks/bench_ldm.py --device cuda --steps 50 --precision bf16 --compile reduce-overhead

``--compile MODE`` wraps the UNet (every DDIM step's network) in ``torch.compile`` with that mode
(``reduce-overhead``: CUDA graphs on a GPU); the warm-up that compiles it is reported as
``warmup_seconds``.  Every run also reports the network's share: ``seconds_per_ddim_step_pair``
(one inversion step + one guided sampling step of all orders) times the steps, and the rest of
the translation (crop, resampling to and from the model grid, normalisation, VQ-VAE, SR head).
``benchmarks/gpu_check.sh`` runs the GPU measurements as one prepared script.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one

import numpy as np
import torch
from torch.nn import functional as F

from bids_dmri_ldm.ml.bundle import Bundle
from bids_dmri_ldm.ml.device import resolve_device
from bids_dmri_ldm.ml.inference import autocast_for, resolve_precision, translate_rish
from bids_dmri_ldm.ml.modelconfig import load_config
from bids_dmri_ldm.ml.networks import build_all, latent_shape
from bids_dmri_ldm.ml.training import make_ldm_loss


def synthetic_participant(shape=(145, 174, 145)):
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    mask = sum(g ** 2 for g in grids) < 0.7
    wave = 1 + 0.3 * np.sin(5 * grids[0]) * np.cos(3 * grids[1])
    rish = np.stack([3 * wave, 0.2 * wave ** 2, 0.03 * wave ** 3], -1).astype(np.float32)
    rish[~mask] = 0
    return rish, mask


def make_bundle(cfg, device):
    torch.manual_seed(0)
    nets = build_all(cfg)
    for net in nets.values():  # as load_bundle does
        net.to(device, memory_format=torch.channels_last_3d).eval()
    norm = {"method": "log-percentile", "orders": cfg["orders"], "eps": [1e-3, 1e-4, 1e-5],
            "low": [0.0, -3.0, -6.0], "high": [1.5, 0.0, -2.0], "background": -1.0}
    return Bundle(dict(cfg, normalisation=norm, latent_scale=1.0), nets, None, "benchmark")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_translation(bundle, rish, mask, device, steps, repeats, precision="auto"):
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        translate_rish(rish, mask, bundle, device=device, ddim_steps=steps, precision=precision)
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def time_step_pair(bundle, device, repeats, precision="auto"):
    """Median time of one DDIM inversion step plus one guided sampling step (3 orders)."""
    cfg = bundle.config
    precision = resolve_precision(cfg, device, precision)  # as translate_rish does
    unet = bundle.networks["unet"]
    n = len(cfg["orders"])
    z = torch.randn(n, *latent_shape(cfg), device=device).contiguous(memory_format=torch.channels_last_3d)
    t = torch.full((n,), 100, device=device)
    labels = torch.zeros(n, dtype=torch.long, device=device)
    times = []
    for _ in range(repeats + 1):  # first one is warm-up
        sync(device)
        start = time.perf_counter()
        with autocast_for(device, precision=precision):
            unet(z, t, labels)                                              # inversion step
            unet(torch.cat([z, z]), torch.cat([t, t]), torch.cat([labels, labels + 2]))  # guided step
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def time_training_steps(cfg, device, batch, repeats):
    nets = build_all(cfg)
    grid = tuple(cfg["grid"])
    results = {}
    ldm_loss = make_ldm_loss(cfg)

    def step(name, fn, params):
        opt = torch.optim.AdamW(params, lr=1e-4)
        times = []
        for _ in range(repeats + 1):  # first one is warm-up
            sync(device)
            t = time.perf_counter()
            opt.zero_grad()
            with autocast_for(device):
                loss = fn()
            loss.backward()
            opt.step()
            sync(device)
            times.append(time.perf_counter() - t)
        results[name] = statistics.median(times[1:])

    for net in nets.values():  # as stageloop.fit_stage does
        net.to(device, memory_format=torch.channels_last_3d)
    vq = nets["vqvae3t"].train()
    x = torch.randn(batch, 1, *grid, device=device).contiguous(memory_format=torch.channels_last_3d)
    def vqvae_loss():
        recon, quant_loss = vq(x)
        return F.l1_loss(recon.float(), x) + quant_loss.float()

    step("vqvae", vqvae_loss, vq.parameters())
    unet = nets["unet"].train()
    z = torch.randn(batch, *latent_shape(cfg), device=device).contiguous(
        memory_format=torch.channels_last_3d)
    lab = torch.zeros(batch, dtype=torch.long, device=device)
    step("ldm", lambda: ldm_loss(unet, [z, lab], torch.arange(batch), 0), unet.parameters())
    sr = nets["sr"].train()
    step("sr", lambda: F.mse_loss(sr(x).float(), x), sr.parameters())
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--config", default="paper")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps to report")
    parser.add_argument("--extrapolate", action="store_true",
                        help="time the pipeline at 1 step and one step pair separately, "
                             "extrapolate to --steps (slow CPUs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="inference arithmetic (translate_rish's precision)")
    parser.add_argument("--compile", default="none",
                        choices=["none", "default", "reduce-overhead", "max-autotune"],
                        help="torch.compile the UNet with this mode (measured, not used by the application)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(resolve_device(args.device))
    cfg = load_config(args.config)
    rish, mask = synthetic_participant()
    bundle = make_bundle(cfg, device)
    if args.compile != "none":
        bundle.networks["unet"] = torch.compile(bundle.networks["unet"], mode=args.compile, dynamic=False)
    sync(device)
    start = time.perf_counter()
    # warm-up; a compiled UNet is warmed up with the measured steps, so that every shape it meets is
    # compiled before the timing
    translate_rish(rish, mask, bundle, device=device, ddim_steps=args.steps if args.compile != "none" else 1,
                   precision=args.precision)
    sync(device)
    warmup = time.perf_counter() - start
    res = {"config": args.config, "grid": cfg["grid"], "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
           "torch": torch.__version__, "input_grid": list(rish.shape[:3]), "guidance": cfg["translation"]["guidance"],
           "precision": args.precision, "precision_used": resolve_precision(cfg, device, args.precision),
           "compile": args.compile, "warmup_seconds": warmup}
    if args.extrapolate:
        # full pipeline at 1 step + (steps - 1) x the median cost of one inversion step
        # (batch of n_orders) and one guided sampling step (conditional + null: 2 x n_orders)
        t1 = time_translation(bundle, rish, mask, device, 1, args.repeats, args.precision)
        per_step = time_step_pair(bundle, device, args.repeats, args.precision)
        res.update(measured_seconds_1_step=t1, seconds_per_ddim_step_pair=per_step,
                   inference_seconds=t1 + (args.steps - 1) * per_step, extrapolated=True)
    else:
        res.update(inference_seconds=time_translation(bundle, rish, mask, device, args.steps, args.repeats,
                                                      args.precision),
                   seconds_per_ddim_step_pair=time_step_pair(bundle, device, args.repeats, args.precision),
                   extrapolated=False)
    # the network's share (every DDIM step costs the same) and the rest of the translation
    res["network_seconds_estimate"] = args.steps * res["seconds_per_ddim_step_pair"]
    res["other_seconds_estimate"] = res["inference_seconds"] - res["network_seconds_estimate"]
    res["ddim_steps"] = args.steps
    if not args.skip_training:
        res["train_step_seconds"] = time_training_steps(cfg, device, args.train_batch, args.repeats)
        res["train_batch"] = args.train_batch
    res["load_average_1_5_15"] = list(os.getloadavg())  # other processes sharing the CPU
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    if device.type == "cuda":
        res["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(res, handle, indent=1)


if __name__ == "__main__":
    main()

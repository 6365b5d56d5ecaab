"""DistributedDataParallel (gloo, 2 CPU processes) matches a single process on the same data."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from bids_dmri_ldm.ml.distributed import DistContext, init_distributed, shutdown
from bids_dmri_ldm.ml.training import train_ldm, train_vqvae

from .conftest import tiny_config


def _data():
    g = torch.Generator().manual_seed(0)
    volumes = torch.randn(8, 1, 16, 16, 16, generator=g)
    latents = torch.randn(8, 4, 4, 4, 4, generator=g)
    labels = torch.tensor([0, 1] * 4)
    return volumes, latents, labels


def _train(ctx, work):
    cfg = tiny_config()
    cfg["training"]["epochs"].update(vqvae3t=2, ldm=2)
    volumes, latents, labels = _data()
    vq, hv = train_vqvae(volumes, cfg, work / "vq", ctx)
    unet, hl = train_ldm(latents, labels, cfg, work / "ldm", ctx)
    return vq.state_dict(), unet.state_dict(), hv, hl


def _worker(rank, world, port, work, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    ctx = init_distributed("cpu")
    result = _train(ctx, work / f"rank{rank}")
    if rank == 0:
        torch.save(result, out)  # test-only exchange between processes
    shutdown(ctx)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    single = _train(DistContext(0, 1, torch.device("cpu")), tmp_path / "single")
    out = tmp_path / "ddp.pt"
    # fork: the children inherit the imported torch/MONAI (spawn re-imports them, ~30 s)
    mp.start_processes(_worker, args=(2, _free_port(), tmp_path, out), nprocs=2, join=True,
                       start_method="fork")
    ddp = torch.load(out, weights_only=True)
    for one, two in zip(single[:2], ddp[:2]):
        for key, value in one.items():
            torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-5, msg=key)
    for one, two in zip(single[2:], ddp[2:]):
        torch.testing.assert_close(torch.tensor([h["train_loss"] for h in two]),
                                   torch.tensor([h["train_loss"] for h in one]), rtol=1e-4, atol=1e-6)

#!/bin/bash
# Multi-GPU training (the group level) with torchrun: one process per GPU, DistributedDataParallel
# over NCCL (bids_dmri_ldm/ml/distributed.py joins the process group torchrun describes).
#
# As a SLURM job on one or more nodes, with the .sif image (docs/container.md):
#   sbatch --nodes=2 examples/torchrun_group.sh /data/bids /data/derivatives/bids-dmri-ldm train.yaml
# On one workstation with Docker (4 GPUs), the same command without SLURM:
#   docker run --rm --gpus all --ipc=host --network none -u "$(id -u):$(id -g)" \
#     --read-only --tmpfs /tmp -v /data/bids:/bids:ro -v "$PWD/out:/out" -v "$PWD/work:/work" \
#     -v "$PWD/train.yaml:/train.yaml:ro" --entrypoint torchrun IMAGE \
#     --standalone --nproc_per_node=4 --no-python \
#     bids-dmri-ldm /bids /out group --config /train.yaml -w /work --device cuda
# (--ipc=host, or a large --shm-size, gives NCCL and the data loaders enough shared memory.)
#
# Arguments after the third are passed on: resubmit a job that hit its time limit with the same
# work dir and `--resume` to continue from its last checkpoint (e.g. `... train.yaml --resume`).
#SBATCH --job-name=bids-dmri-ldm-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --mem=128G
#SBATCH --time=24:00:00
#SBATCH --output=logs/bids-dmri-ldm-train_%j.out
set -euo pipefail

BIDS_DIR=$(realpath "${1:?usage: sbatch $0 BIDS_DIR OUTPUT_DIR TRAIN_CONFIG}")
OUTPUT_DIR=$(realpath -m "${2:?usage: sbatch $0 BIDS_DIR OUTPUT_DIR TRAIN_CONFIG}")
TRAIN_CONFIG=$(realpath "${3:?usage: sbatch $0 BIDS_DIR OUTPUT_DIR TRAIN_CONFIG}")
SIF=${SIF:-$HOME/images/bids-dmri-ldm.sif}
WORK_DIR=${WORK_DIR:-$(dirname "$OUTPUT_DIR")/bids-dmri-ldm-train-work}
APPTAINER=$(command -v apptainer || command -v singularity)
mkdir -p "$OUTPUT_DIR" "$WORK_DIR"

gpus_per_node=$(nvidia-smi -L | wc -l)
nodes=${SLURM_JOB_NUM_NODES:-1}
# Rendezvous on the first node of the allocation (any free port).
head_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" 2>/dev/null | head -1)
head_node=${head_node:-$(hostname)}

# srun starts one torchrun per node; each torchrun starts one process per GPU.
srun --ntasks="$nodes" --ntasks-per-node=1 \
    "$APPTAINER" exec --nv --cleanenv \
    -B "$BIDS_DIR:/bids:ro" -B "$OUTPUT_DIR:/out" -B "$WORK_DIR:/work" \
    -B "$TRAIN_CONFIG:/train.yaml:ro" \
    "$SIF" torchrun \
    --nnodes="$nodes" --nproc_per_node="$gpus_per_node" \
    --rdzv_backend=c10d --rdzv_endpoint="$head_node:29500" --rdzv_id="${SLURM_JOB_ID:-local}" \
    --no-python \
    bids-dmri-ldm /bids /out group --config /train.yaml -w /work --device cuda "${@:4}"

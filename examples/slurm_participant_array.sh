#!/bin/bash
# One participant per SLURM array task, with Apptainer (or Singularity) and the bids-dmri-ldm
# image converted to a .sif (docs/container.md):
#
#   n=$(find /data/bids -maxdepth 1 -name 'sub-*' -type d | wc -l)
#   sbatch --array=0-$((n - 1)) examples/slurm_participant_array.sh /data/bids /data/derivatives/bids-dmri-ldm
#
# Every task gets its own work directory (on node-local scratch when the cluster offers it), so
# tasks never share intermediate files; the derivatives are written atomically, so all tasks
# can share one output directory.  A failed task can simply be resubmitted
# (sbatch --array=<its index> ...): finished runs are skipped, unfinished ones resume.
#
# Edit the #SBATCH lines for your cluster.  Drop --gres (and the job runs on CPU) if you have
# no GPU partition.
#SBATCH --job-name=bids-dmri-ldm
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=02:00:00
#SBATCH --gres=gpu:1
#SBATCH --output=logs/bids-dmri-ldm_%A_%a.out
set -euo pipefail

BIDS_DIR=$(realpath "${1:?usage: sbatch --array=0-N $0 BIDS_DIR OUTPUT_DIR}")
OUTPUT_DIR=$(realpath -m "${2:?usage: sbatch --array=0-N $0 BIDS_DIR OUTPUT_DIR}")
SIF=${SIF:-$HOME/images/bids-dmri-ldm.sif}
APPTAINER=$(command -v apptainer || command -v singularity)

# The participant of this task: the sorted sub-* folders of the dataset, 0-based.
mapfile -t participants < <(find "$BIDS_DIR" -mindepth 1 -maxdepth 1 -type d -name 'sub-*' \
    -printf '%f\n' | sort)
task=${SLURM_ARRAY_TASK_ID:?submit with sbatch --array}
if [ "$task" -ge "${#participants[@]}" ]; then
    echo "array index $task but only ${#participants[@]} participants in $BIDS_DIR" >&2
    exit 64
fi
label=${participants[$task]#sub-}

# Own work directory: node-local scratch if any, else beside the outputs.
scratch=${SLURM_TMPDIR:-${TMPDIR:-$(dirname "$OUTPUT_DIR")}}
WORK_DIR=$scratch/bids-dmri-ldm-work/sub-$label
mkdir -p "$OUTPUT_DIR" "$WORK_DIR"

gpu=()
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] || [ -n "${SLURM_JOB_GPUS:-}" ]; then
    gpu=(--nv)
fi

# --cleanenv: the host's Python/CUDA variables do not leak in; the image sets its own caches
# under /tmp, which Apptainer binds from the host.  The input is bound read-only.
"$APPTAINER" run "${gpu[@]}" --cleanenv \
    -B "$BIDS_DIR:/bids:ro" -B "$OUTPUT_DIR:/out" -B "$WORK_DIR:/work" \
    "$SIF" /bids /out participant \
    --participant-label "$label" \
    -w /work \
    --nprocs "${SLURM_CPUS_PER_TASK:-1}" \
    --device auto

#!/usr/bin/env bash
# Rebuild the shipped default rish-global model (models/rish-global/) from simulated data.
#
#   tools/make_rish_global.sh [SCRATCH_DIR]
#
# 1. simulate 2 paired 3T/7T participants (bids_dmri_ldm.simulate, --voxel-scale 4, seed 2024);
# 2. run the group level with --method rish-global (median of the voxel-wise RISH scale maps,
#    Eq. 2, over brain voxels of both pairs, source maps resampled onto the 7T grid);
# 3. copy rish_global.json + SHA256SUMS into models/rish-global/.
# The result is deterministic for a given simulator version and seed.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-${HERE}/.venv/bin/python}"
SCRATCH="${1:-$(mktemp -d)}"
SEED="${SEED:-2024}"
mkdir -p "${SCRATCH}"
rm -rf "${SCRATCH}/bids" "${SCRATCH}/out" "${SCRATCH}/work"

"${PY}" -m bids_dmri_ldm.simulate "${SCRATCH}/bids" --subjects 2 --voxel-scale 4 --seed "${SEED}"
"${PY}" "${HERE}/run.py" "${SCRATCH}/bids" "${SCRATCH}/out" group --method rish-global \
    -w "${SCRATCH}/work" --skip-bids-validation

mkdir -p "${HERE}/models/rish-global"
cp "${SCRATCH}/out/models/rish-global/rish_global.json" "${SCRATCH}/out/models/rish-global/SHA256SUMS" \
   "${HERE}/models/rish-global/"
(cd "${HERE}/models/rish-global" && sha256sum -c SHA256SUMS)
echo "rish-global model written to ${HERE}/models/rish-global (scratch: ${SCRATCH})"

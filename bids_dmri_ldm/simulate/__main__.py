"""``python -m bids_dmri_ldm.simulate OUT_DIR --subjects N ...`` (see :mod:`.cli`)."""
import os
import sys

# The simulator parallelises over scans (--nprocs); its matrix products are small, and BLAS
# threads on top of the worker processes only oversubscribe the cores (measured: +30 % CPU time
# for a --voxel-scale 4 pair). Set before numpy is imported; an explicit user setting wins.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

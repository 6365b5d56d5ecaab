"""File input/output of the pipeline's images (no BIDS, no nipype): :mod:`.nifti`."""

"""File input/output (no BIDS, no nipype): :mod:`.files` (atomic writes of files and folders) and :mod:`.nifti` (NIfTI streaming, ISA-L gzip)."""

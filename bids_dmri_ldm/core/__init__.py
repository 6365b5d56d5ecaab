"""Pure signal core: gradients, SH/RISH, normalisation/rebuild, masks, resampling, metrics.

numpy (and torch for SSIM) only: no BIDS, no nipype, no run configuration.
"""

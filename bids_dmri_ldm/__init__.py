"""bids-dmri-ldm: 3T to 7T-like diffusion MRI with a latent diffusion model.

Layout (imports flow one way: core <- ml <- interfaces <- workflows <- cli):

core/        pure numpy/torch signal code (gradients, SH, RISH, resampling, metrics)
ml/          networks, diffusion maths, training and inference (no BIDS, no nipype)
bids/        pybids queries, 3T/7T pairing, derivative naming and sidecars
interfaces/  nipype interfaces wrapping core/ and ml/
workflows/   nipype workflow factories
cli/         command line (parser, participant and group levels)
reports/     figures and HTML reports
simulate/    paired 3T/7T physics simulator
"""
from ._version import __version__

__all__ = ["__version__"]

"""The names the package and its command line share: translation methods, training stages, scale
references, and the default method. The one place each list is written.

Bottom layer: imports nothing from the package, so that the command line (``--method``,
``--stage``, ``--scale-reference`` choices), the run settings (:mod:`bids_dmri_ldm.config`), the
method registry (:mod:`bids_dmri_ldm.methods`) and training (:mod:`bids_dmri_ldm.ml.training`)
read the same values.
"""
from __future__ import annotations

from enum import Enum


class Method(str, Enum):
    """Translation methods selectable with ``--method``."""

    IDENTITY = "identity"
    RISH_GLOBAL = "rish-global"
    LDM = "ldm"
    CNN = "cnn"

    def __str__(self) -> str:  # argparse choices / messages show the plain value
        return self.value


METHOD_CHOICES: tuple[str, ...] = tuple(m.value for m in Method)
"""``--method`` choices, in :class:`Method` order."""

DEFAULT_METHOD = Method.LDM.value
"""The default ``--method``: the latent diffusion model with the shipped ``models/demo`` bundle.
It is not worse than ``identity`` on its validation pairs (a test keeps it so); on held-out
simulated subjects of the training physics it beats ``identity``, the untouched 3T scan and
``rish-global`` in all 8 of the paper's columns against the 7T scans, the ``cnn`` baseline is
better than it in all 8, and on the shifted physics preset it loses to ``identity`` in 5 of the 8
(docs/evaluation_results.md); every shipped model is a demonstration trained on simulated data."""

LDM_STAGES: tuple[str, ...] = ("vqvae3t", "vqvae7t", "ldm", "sr")
"""The ldm's training stages, in training order (each needs the ones before it)."""

ALL_STAGES = "all"
"""``--stage all``: every stage of :data:`LDM_STAGES`."""

STAGE_CHOICES: tuple[str, ...] = (*LDM_STAGES, ALL_STAGES)
"""``--stage`` choices at the group level."""

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
"""Network arithmetic of ldm/cnn inference (``--precision``): ``auto`` is mixed precision on CUDA
(bfloat16 where the GPU supports it, else float16) and, on the CPU, the bundle's
``translation.cpu_precision`` where the CPU computes bfloat16 natively (the ``paper`` config:
bfloat16), float32 otherwise; ``fp32`` is float32
everywhere; ``bf16`` is bfloat16 autocast on CUDA and on the CPU too (faster 3D convolutions on a
CPU with AVX512-BF16 or AMX; results differ from float32 by bfloat16 rounding)."""

CPU_PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
"""Values of a model config's optional ``translation.cpu_precision``: what ``--precision auto``
means for that bundle on a CPU with native bfloat16 (``ml.inference.resolve_precision``)."""

SCALE_REFERENCES: tuple[str, ...] = ("input", "roundtrip")
"""Denominators of the learned methods' scale maps: the input 3T RISH, or its round trip through
the model's lossy path (``--scale-reference``)."""

SELECT_EPOCHS: tuple[str, ...] = ("last", "best-validation")
"""``training.select_epoch`` of a cnn config: keep the weights of the last epoch (default), or those
of the epoch with the lowest validation loss (:func:`bids_dmri_ldm.ml.stageloop.fit_stage`)."""

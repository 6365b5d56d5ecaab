"""Model configuration: loading, defaults and strict key validation.

A *training config* (``ml/configs/demo.json``, ``ml/configs/paper.json`` or a
user's file) describes the architecture, the diffusion schedule, the
translation defaults and the training schedule.  A *bundle config* is the same
document plus what training learned (normalisation, latent scale) and
provenance (training data summary, software versions).  Every section is
checked against the schema below: an unknown or a missing key is refused with a
:class:`ConfigError` naming the key, so a typo never silently falls back to a
default.  Field-by-field documentation: ``docs/training.md``.
"""
from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..vocabulary import CPU_PRECISIONS, LDM_STAGES, SELECT_EPOCHS

#: Version of the bundle/config layout; bumped on incompatible changes.
FORMAT_VERSION = 1

#: Field-strength classes of the conditional diffusion model (paper Eq. 9-10).
CLASS_3T, CLASS_7T, CLASS_NULL = 0, 1, 2
CLASS_NAMES = {"3T": CLASS_3T, "7T": CLASS_7T, "null": CLASS_NULL}


DEFAULT_SCALE_REFERENCE = "roundtrip"
"""ldm scale-map reference when a bundle's ``translation`` names none (docs/evaluation_results.md)."""

DEFAULT_SCALE_SMOOTHING = 0.0
"""Gaussian sigma of the scale-map smoothing, in model-grid voxels (0: none), when a bundle names none."""


class ConfigError(ValueError):
    """A model or training configuration is malformed (unknown/missing key, bad value)."""


# Schema: section -> set of required keys.  Nested dicts are checked one level deep.
_SCHEMA: dict[str, set[str]] = {
    "vqvae": {"channels", "num_res_layers", "num_res_channels", "embedding_dim",
              "num_embeddings", "commitment_cost", "decay"},
    "unet": {"channels", "num_res_blocks", "norm_num_groups", "num_head_channels",
             "class_embedding_dim"},
    "sr": {"channels", "num_res_blocks"},
    "diffusion": {"num_train_timesteps", "schedule", "beta_start", "beta_end"},
    "translation": {"t0", "guidance", "ddim_steps", "invert_class", "requantise",
                    "num_samples", "seed", "crop_margin", "sample_eta"},
    "training": {"seed", "val_fraction", "batch_size", "lr", "weight_decay", "epochs",
                 "cfg_dropout", "vqvae7t_init", "amp", "sr_ddim_steps", "latent_batch_size",
                 "calibrate_t0", "calibrate_guidance"},
}
# Optional keys: may be absent (the code's default applies); unknown keys are still refused.
_OPTIONAL: dict[str, set[str]] = {
    # ldm scale maps (bids_dmri_ldm.methods.LdmMethod): "input" | "roundtrip", and the
    # Gaussian sigma of the lambda smoothing in model-grid voxels (0: none); per-order linear
    # gains of the predicted 7T and the round-trip 3T RISH (calibration.calibrate_linear_gains);
    # what --precision auto means on a CPU with native bfloat16 (inference.resolve_precision)
    "translation": {"scale_reference", "scale_smoothing", "scale_strength", "scale_gain", "gain_7t", "gain_3t",
                    "cpu_precision"},
    # per-order RISH normalisation (ml/normalise.py): "sqrt-percentile" | "log-percentile" (default,
    # what bundles that name none were trained with)
    "training": {"normalisation", "calibrate_smoothing"},
}
_TOP_TRAINING = {"format_version", "name", "description", "grid", "orders", *_SCHEMA}
_TOP_BUNDLE_EXTRA = {"normalisation", "latent_scale", "training_data", "software", "created"}
_EPOCH_KEYS = set(LDM_STAGES)  # one epoch count per training stage
#: Optional top-level keys of every config: ``method`` (default "ldm") and what the model was
#: trained for (``trained_for``, set by the group level); of bundles: the validation table the
#: group level's gate wrote (:mod:`bids_dmri_ldm.evaluation.gate`).
_TOP_OPTIONAL = {"method", "trained_for"}
_BUNDLE_OPTIONAL = {"validation"}

METHODS = ("ldm", "cnn")
"""Learned methods a config can describe (``"method"``; absent means ``"ldm"``)."""

# The cnn baseline (Karayumak et al. 2018 style; bids_dmri_ldm.ml.cnn): a residual 3D UNet
# regressing normalised 7T log-RISH from 3T log-RISH on the model grid.
_CNN_SCHEMA: dict[str, set[str]] = {
    "cnn": {"channels", "strides", "num_res_units"},
    "translation": {"crop_margin"},
    "training": {"seed", "val_fraction", "batch_size", "lr", "weight_decay", "epochs", "amp"},
}
_CNN_OPTIONAL: dict[str, set[str]] = {
    "translation": {"scale_reference", "scale_smoothing", "scale_strength", "scale_gain", "cpu_precision"},
    # which epoch's weights the cnn keeps (vocabulary.SELECT_EPOCHS, default "last"); not for the ldm,
    # whose later stages are trained from the earlier ones' checkpoints
    "training": {"augment_flip", "normalisation", "calibrate_smoothing", "select_epoch"},
}
_CNN_TOP = {"format_version", "method", "name", "description", "grid", "orders", *_CNN_SCHEMA}
_CNN_BUNDLE_EXTRA = {"normalisation", "training_data", "software", "created"}


def config_method(cfg: dict[str, Any]) -> str:
    """The learned method a config describes: ``cfg["method"]``, ``"ldm"`` when absent."""
    method = cfg.get("method", "ldm")
    if method not in METHODS:
        raise ConfigError(f"config method {method!r} is not one of {list(METHODS)}")
    return method


def _check_keys(found: dict, expected: set[str], where: str, optional: set[str] = frozenset()) -> None:
    unknown = sorted(set(found) - expected - set(optional))
    missing = sorted(expected - set(found))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(expected)}")
    if missing:
        raise ConfigError(f"missing key(s) {missing} in {where}")


def validate_config(cfg: dict[str, Any], kind: str = "training") -> dict[str, Any]:
    """Check a config's keys and basic values; return it unchanged.

    Parameters
    ----------
    cfg : dict
        Parsed JSON config.
    kind : {"training", "bundle"}
        A bundle config must also hold the learned/provenance sections.

    Raises
    ------
    ConfigError
        Unknown or missing key, wrong format version, inconsistent sizes.
    """
    if not isinstance(cfg, dict):
        raise ConfigError("config must be a JSON object")
    if config_method(cfg) == "cnn":
        return _validate_cnn_config(cfg, kind)
    top = set(_TOP_TRAINING) | (_TOP_BUNDLE_EXTRA if kind == "bundle" else set())
    _check_keys(cfg, top, "config", _TOP_OPTIONAL | (_BUNDLE_OPTIONAL if kind == "bundle" else set()))
    _check_format_version(cfg)
    for section, keys in _SCHEMA.items():
        if not isinstance(cfg[section], dict):
            raise ConfigError(f"config section {section!r} must be an object")
        _check_keys(cfg[section], keys, f"section {section!r}", _OPTIONAL.get(section, set()))
    _check_keys(cfg["training"]["epochs"], _EPOCH_KEYS, "training.epochs")
    grid = cfg["grid"]
    if len(grid) != 3 or any(int(g) < 4 for g in grid):
        raise ConfigError(f"grid must be three sizes >= 4, got {grid}")
    factor = 2 ** len(cfg["vqvae"]["channels"])
    if any(int(g) % factor for g in grid):
        raise ConfigError(f"grid {grid} must be divisible by the VQ-VAE downsampling {factor}")
    n_orders = len(cfg["orders"])
    for key in ("t0", "guidance"):
        if len(cfg["translation"][key]) != n_orders:
            raise ConfigError(f"translation.{key} needs one value per order {cfg['orders']}")
    t_max = cfg["diffusion"]["num_train_timesteps"] - 1
    if any(not 0 < int(t) <= t_max for t in cfg["translation"]["t0"]):
        raise ConfigError(f"translation.t0 values must lie in 1..{t_max}")
    _check_translation_options(cfg["translation"], len(cfg["orders"]))
    if cfg["translation"]["invert_class"] not in CLASS_NAMES:
        raise ConfigError(f"translation.invert_class must be one of {sorted(CLASS_NAMES)}")
    if cfg["training"]["vqvae7t_init"] not in ("3T", "scratch"):
        raise ConfigError("training.vqvae7t_init must be '3T' or 'scratch'")
    groups = cfg["unet"]["norm_num_groups"]
    if any(c % groups for c in cfg["unet"]["channels"]):
        raise ConfigError(f"unet.channels {cfg['unet']['channels']} must be divisible by "
                          f"norm_num_groups={groups}")
    _check_trained_for(cfg)
    _check_normalisation(cfg, kind)
    return cfg


def _check_trained_for(cfg: dict[str, Any]) -> None:
    """A ``trained_for`` record, when present, is valid and names the config's RISH orders."""
    if "trained_for" in cfg:
        validate_trained_for(cfg["trained_for"], "config.trained_for")
        if list(cfg["trained_for"]["rish_orders"]) != [int(o) for o in cfg["orders"]]:
            raise ConfigError(f"trained_for.rish_orders {cfg['trained_for']['rish_orders']} differ from "
                              f"orders {cfg['orders']}")


def _check_format_version(cfg: dict[str, Any]) -> None:
    if cfg["format_version"] != FORMAT_VERSION:
        raise ConfigError(
            f"config format_version {cfg['format_version']!r} is not supported by this "
            f"version of bids-dmri-ldm (expects {FORMAT_VERSION}); retrain or upgrade")


def _check_translation_options(translation: dict[str, Any], n_orders: int) -> None:
    """The optional translation keys (:data:`_OPTIONAL`): CPU precision and the scale maps'."""
    if translation.get("cpu_precision", "fp32") not in CPU_PRECISIONS:
        raise ConfigError(f"translation.cpu_precision must be one of {list(CPU_PRECISIONS)}")
    if translation.get("scale_reference", "roundtrip") not in ("input", "roundtrip"):
        raise ConfigError("translation.scale_reference must be 'input' or 'roundtrip'")
    sigma = translation.get("scale_smoothing", 0.0)
    values = [sigma] if isinstance(sigma, (int, float)) else list(sigma) if isinstance(sigma, list) else [None]
    if not all(isinstance(v, (int, float)) and v >= 0 for v in values):
        raise ConfigError("translation.scale_smoothing must be a number >= 0 (model-grid voxels) or a list "
                          "of one per RISH order")
    if isinstance(sigma, list) and len(sigma) != n_orders:
        raise ConfigError(f"translation.scale_smoothing lists {len(sigma)} values for {n_orders} RISH orders")
    alpha = translation.get("scale_strength", 1.0)
    alphas = [alpha] if isinstance(alpha, (int, float)) else list(alpha) if isinstance(alpha, list) else [None]
    if not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in alphas) or \
            (isinstance(alpha, list) and len(alpha) != n_orders):
        raise ConfigError("translation.scale_strength must be a number in [0, 1] or a list of one per RISH order")
    gain = translation.get("scale_gain", 1.0)
    gains = [gain] if isinstance(gain, (int, float)) else list(gain) if isinstance(gain, list) else [None]
    if not all(isinstance(v, (int, float)) and 0 < v < 100 for v in gains) or \
            (isinstance(gain, list) and len(gain) != n_orders):
        raise ConfigError("translation.scale_gain must be a number in (0, 100) or a list of one per RISH order")


def _check_select_epoch(cfg: dict[str, Any]) -> None:
    """``training.select_epoch``, when given, is one of :data:`~bids_dmri_ldm.vocabulary.SELECT_EPOCHS`."""
    if cfg["training"].get("select_epoch", "last") not in SELECT_EPOCHS:
        raise ConfigError(f"training.select_epoch must be one of {list(SELECT_EPOCHS)}, "
                          f"got {cfg['training']['select_epoch']!r}")


def _check_normalisation(cfg: dict[str, Any], kind: str) -> None:
    """``training.normalisation`` names a known method; a bundle's fitted parameters are complete."""
    from .normalise import LEGACY_METHOD, METHODS, parameter_keys

    wanted = cfg["training"].get("normalisation", LEGACY_METHOD)
    if wanted not in METHODS:
        raise ConfigError(f"training.normalisation must be one of {list(METHODS)}, got {wanted!r}")
    if kind == "bundle":
        method = cfg["normalisation"].get("method") if isinstance(cfg["normalisation"], dict) else None
        if method not in METHODS:
            raise ConfigError(f"normalisation.method must be one of {list(METHODS)}, got {method!r}")
        _check_keys(cfg["normalisation"], parameter_keys(method), "section 'normalisation'")


def _validate_cnn_config(cfg: dict[str, Any], kind: str) -> dict[str, Any]:
    """Keys and values of a ``"method": "cnn"`` config (see :data:`_CNN_SCHEMA`)."""
    top = _CNN_TOP | (_CNN_BUNDLE_EXTRA if kind == "bundle" else set())
    _check_keys(cfg, top, "config", {"trained_for"} | (_BUNDLE_OPTIONAL if kind == "bundle" else set()))
    _check_format_version(cfg)
    for section, keys in _CNN_SCHEMA.items():
        if not isinstance(cfg[section], dict):
            raise ConfigError(f"config section {section!r} must be an object")
        _check_keys(cfg[section], keys, f"section {section!r}", _CNN_OPTIONAL.get(section, set()))
    _check_keys(cfg["training"]["epochs"], {"cnn"}, "training.epochs")
    c = cfg["cnn"]
    if len(c["channels"]) < 2 or len(c["strides"]) != len(c["channels"]) - 1:
        raise ConfigError("cnn.channels needs >= 2 levels and cnn.strides one stride fewer")
    factor = 1
    for stride in c["strides"]:
        factor *= int(stride)
    if len(cfg["grid"]) != 3 or any(int(g) < 4 or int(g) % factor for g in cfg["grid"]):
        raise ConfigError(f"grid {cfg['grid']} must be three sizes >= 4 divisible by the UNet's "
                          f"downsampling {factor}")
    _check_translation_options(cfg["translation"], len(cfg["orders"]))
    _check_trained_for(cfg)
    _check_normalisation(cfg, kind)
    _check_select_epoch(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# what a model was trained for (every method with a model records it; the participant level
# refuses data processed differently)

SIGNAL_NORMALISATION = "S/S0"
"""How the DWI signal is normalised before the SH fit (:func:`bids_dmri_ldm.core.signal.fit_shell_sh`:
each volume divided by the voxel's mean b0, clipped to [0, 1])."""

TRAINED_FOR_KEYS = ("shells", "sh_order_max", "rish_orders", "signal_normalisation")
"""Keys of a model's ``trained_for`` record."""


def trained_for(shell, sh_order_max: int, rish_orders, signal_normalisation: str = SIGNAL_NORMALISATION
                ) -> dict[str, Any]:
    """The ``trained_for`` record of a model trained on ``shell`` (s/mm²; one b-value, or a
    sequence of them for a model holding several shells) with these settings."""
    shells = [float(b) for b in shell] if isinstance(shell, (list, tuple)) else [float(shell)]
    return {"shells": shells, "sh_order_max": int(sh_order_max),
            "rish_orders": [int(o) for o in rish_orders], "signal_normalisation": str(signal_normalisation)}


def validate_trained_for(record: Any, where: str = "trained_for") -> dict[str, Any]:
    """Check a ``trained_for`` record (keys of :data:`TRAINED_FOR_KEYS`, sane values); return it.

    Raises
    ------
    ConfigError
    """
    if not isinstance(record, dict):
        raise ConfigError(f"{where} must be an object with keys {list(TRAINED_FOR_KEYS)}")
    _check_keys(record, set(TRAINED_FOR_KEYS), where)
    shells = record["shells"]
    if (not isinstance(shells, list) or not shells
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0 for b in shells)):
        raise ConfigError(f"{where}.shells must be a non-empty list of b-values > 0 (s/mm²), got {shells!r}")
    if record["sh_order_max"] not in (2, 4, 6, 8):
        raise ConfigError(f"{where}.sh_order_max must be 2, 4, 6 or 8, got {record['sh_order_max']!r}")
    orders = record["rish_orders"]
    if not isinstance(orders, list) or not orders or not all(isinstance(o, int) and o % 2 == 0 for o in orders):
        raise ConfigError(f"{where}.rish_orders must be a list of even orders, got {orders!r}")
    if not isinstance(record["signal_normalisation"], str):
        raise ConfigError(f"{where}.signal_normalisation must be a string such as {SIGNAL_NORMALISATION!r}")
    return record


def trained_for_mismatches(record: dict[str, Any], shell: float | None, shell_tolerance: float, sh_order_max: int,
                           rish_orders, signal_normalisation: str = SIGNAL_NORMALISATION
                           ) -> list[tuple[str, str, str]]:
    """What differs between a model's ``trained_for`` record and the data a run will give it.

    The shell matches when a trained shell lies within ``shell_tolerance`` of ``shell`` (the
    volumes the run selects; ``None``: not compared here, the shells of each run are matched
    one by one, :func:`bids_dmri_ldm.core.shells.plan_volumes`); the SH order, the RISH orders
    and the signal normalisation must be equal.

    Returns
    -------
    list of (setting, the model's value, the run's value)
        Empty when everything matches.
    """
    found = []
    shells = [float(b) for b in record["shells"]]
    if shell is not None and not any(abs(b - float(shell)) <= float(shell_tolerance) for b in shells):
        found.append(("shell", "b=" + "/".join(f"{b:g}" for b in shells) + " s/mm²",
                      f"--shell {float(shell):g} (tolerance {float(shell_tolerance):g})"))
    if int(record["sh_order_max"]) != int(sh_order_max):
        found.append(("SH order", str(record["sh_order_max"]), f"--sh-order {int(sh_order_max)}"))
    if [int(o) for o in record["rish_orders"]] != [int(o) for o in rish_orders]:
        found.append(("RISH orders", "/".join(str(o) for o in record["rish_orders"]),
                      "/".join(str(int(o)) for o in rish_orders)))
    if record["signal_normalisation"] != signal_normalisation:
        found.append(("signal normalisation", record["signal_normalisation"], signal_normalisation))
    return found


def builtin_config_names() -> list[str]:
    """Names of the configs shipped in ``bids_dmri_ldm/ml/configs``."""
    folder = resources.files("bids_dmri_ldm.ml") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_config(name_or_path: str | Path) -> dict[str, Any]:
    """Load and validate a training config: built-in name (``demo``, ``paper``) or a JSON/YAML file."""
    text_path = Path(name_or_path)
    if not text_path.is_file():
        if str(name_or_path) not in builtin_config_names():
            raise ConfigError(f"config {name_or_path!r} is neither a file nor one of the "
                              f"built-in configs {builtin_config_names()}")
        text = (resources.files("bids_dmri_ldm.ml") / "configs" / f"{name_or_path}.json").read_text()
    else:
        text = text_path.read_text()
    if text_path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config {name_or_path} is not valid YAML: {err}") from None
    else:
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config {name_or_path} is not valid JSON: {err}") from None
    return validate_config(cfg, "training")


def training_part(cfg: dict[str, Any]) -> dict[str, Any]:
    """Copy of a (bundle) config restricted to the training-config keys."""
    keys = _CNN_TOP if config_method(cfg) == "cnn" else _TOP_TRAINING | _TOP_OPTIONAL
    return {k: copy.deepcopy(v) for k, v in cfg.items() if k in keys}

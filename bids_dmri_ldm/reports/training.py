"""Group-level training report: ``OUTPUT_DIR/group_training.html``.

:func:`render_training_report` takes in-memory curves, metrics, example
volumes and dicts; :func:`build_training_report` fills whatever is not given
from the files the group level leaves in ``OUTPUT_DIR`` (:data:`TRAINING_FILES`,
the one table to adapt to the training code's names). Each part is built
through :func:`~bids_dmri_ldm.reports.html.report_section`, so a missing or
malformed file shows as a message in the report instead of an exception.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from bids_dmri_ldm.io.files import atomic_path, atomic_write_text
from bids_dmri_ldm.reports import training_figures
from bids_dmri_ldm.reports.plotting import to_png
from bids_dmri_ldm.reports.html import (
    LOGGER,
    ReportInputError,
    Section,
    figure_html,
    paragraph,
    preformatted,
    render_document,
    report_section,
    table_html,
)
from bids_dmri_ldm.vocabulary import LDM_STAGES

#: Glob patterns (relative to OUTPUT_DIR, searched recursively, ``sub-*``
#: folders excluded) of the group level's files, per role.
TRAINING_FILES: dict[str, tuple[str, ...]] = {
    "losses": ("*loss*.csv",),
    "validation": ("*valid*.csv", "*val_metrics*.csv", "*metrics*.csv"),
    "config": ("config.json", "*config*.json", "*config*.yaml", "*config*.yml"),
    "examples": ("*example*.npz",),
}
#: Column that holds the stage name when one CSV holds several stages.
STAGE_COLUMN = "stage"
#: Training stages in pipeline order (:data:`bids_dmri_ldm.vocabulary.LDM_STAGES`); others follow, sorted.
STAGE_ORDER = LDM_STAGES
#: Columns that are bookkeeping, not curves.
_NOT_CURVES = ("second", "time", "lr")


def plot_losses(history: Sequence[Mapping[str, float]], png_path: str | Path, title: str) -> None:
    """Draw one training stage's loss curve (train and, unless all NaN, validation loss per epoch,
    log scale) to ``png_path`` atomically (matplotlib Agg). Given to the trainers
    (:data:`bids_dmri_ldm.ml.training.PlotFn`), which call it while they train."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    if any(h["val_loss"] == h["val_loss"] for h in history):  # not all NaN
        ax.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax.set_xlabel("epoch"), ax.set_ylabel("loss"), ax.set_title(title), ax.legend()
    ax.set_yscale("log")
    fig.tight_layout()
    with atomic_path(png_path, suffix=".png") as tmp_png:
        fig.savefig(tmp_png, dpi=100)
    plt.close(fig)


def order_stages(curves: Mapping[str, Mapping]) -> dict:
    """Stages in pipeline order (:data:`STAGE_ORDER`), unknown ones after, sorted."""
    rank = {stage: i for i, stage in enumerate(STAGE_ORDER)}
    return {k: curves[k] for k in sorted(curves, key=lambda k: (rank.get(k, len(rank)), k))}


def loss_columns(columns: Mapping[str, np.ndarray], x_key: str = "epoch") -> dict[str, np.ndarray]:
    """The x column and the loss columns (names containing 'loss'; all numeric ones without)."""
    losses = {k: v for k, v in columns.items() if "loss" in k.lower()}
    if not losses:
        losses = {k: v for k, v in columns.items()
                  if k != x_key and not any(n in k.lower() for n in _NOT_CURVES)}
    return ({x_key: columns[x_key]} if x_key in columns else {}) | losses


def validation_from_losses(losses: Mapping[str, Mapping[str, np.ndarray]], x_key: str = "epoch") -> dict:
    """Per-stage validation columns (``val*``) of the loss logs, when no metrics file exists."""
    out = {}
    for stage, columns in losses.items():
        val = {k: v for k, v in columns.items()
               if k.lower().startswith("val") and np.isfinite(np.asarray(v, float)).any()}
        if val:
            out[stage] = ({x_key: columns[x_key]} if x_key in columns else {}) | val
    return out


def read_csv_columns(path: str | Path) -> dict[str, np.ndarray | list[str]]:
    """Columns of a CSV with a header: numeric ones as float arrays, others as strings."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{Path(path).name} has no data rows")
    columns: dict[str, np.ndarray | list[str]] = {}
    for name in rows[0]:
        values = [row.get(name, "") for row in rows]
        try:
            columns[name] = np.array([float(v) if v not in ("", None) else np.nan for v in values])
        except ValueError:
            columns[name] = [str(v) for v in values]
    return columns


def split_by_stage(columns: Mapping[str, object], default: str) -> dict[str, dict[str, np.ndarray]]:
    """``{stage: numeric columns}``; the whole table under ``default`` when there is no stage column."""
    numeric = {k: v for k, v in columns.items() if isinstance(v, np.ndarray)}
    stages = columns.get(STAGE_COLUMN)
    if not isinstance(stages, list):
        return {default: numeric}
    out = {}
    for stage in dict.fromkeys(stages):
        keep = np.array([s == stage for s in stages])
        out[stage] = {k: v[keep] for k, v in numeric.items()}
    return out


def stage_from_filename(path: Path) -> str:
    """Stage name from a file name: ``loss_vqvae3t.csv``, ``vqvae3t_losses.csv`` -> ``vqvae3t``."""
    stem = re.sub(r"(^|[_-])(losses|loss|validation|valid|val_metrics|metrics)([_-]|$)", "_",
                  path.stem).strip("_-")
    return stem or path.parent.name


def _discover(output_dir: Path, role: str) -> list[Path]:
    found: list[Path] = []
    for pattern in TRAINING_FILES[role]:
        for path in sorted(output_dir.rglob(pattern)):
            rel = path.relative_to(output_dir).parts
            if rel[0].startswith("sub-") or path in found:
                continue
            found.append(path)
        if found:
            break
    return found


def load_curves(paths: Sequence[Path]) -> dict[str, dict[str, np.ndarray]]:
    """Read loss or metric CSVs into ``{stage: {column: values}}``."""
    curves: dict[str, dict[str, np.ndarray]] = {}
    for path in paths:
        curves.update(split_by_stage(read_csv_columns(path), stage_from_filename(path)))
    return curves


def load_config(path: Path) -> dict:
    """A JSON or YAML configuration file as a dict."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return dict(yaml.safe_load(text) or {})
    return dict(json.loads(text))


def load_examples(paths: Sequence[Path]) -> list[dict]:
    """Example volumes from ``.npz`` files with ``source``/``prediction``/``target`` arrays."""
    examples = []
    for path in paths:
        with np.load(path, allow_pickle=False) as data:
            example = {k: data[k] for k in ("source", "prediction", "target", "mask") if k in data}
        example["label"] = path.stem
        examples.append(example)
    return examples


def _losses_blocks(losses) -> list[str]:
    if not losses:
        raise ReportInputError("no loss CSV found (expected files matching "
                               f"{', '.join(TRAINING_FILES['losses'])})")
    curves = {stage: loss_columns(columns) for stage, columns in order_stages(losses).items()}
    png = to_png(training_figures.loss_curves_figure(curves))
    return [figure_html(png, "loss curves", "Training (and validation) losses per stage; log "
                        "scale when all values are positive.")]


def _validation_blocks(validation) -> list[str]:
    if not validation:
        raise ReportInputError("no validation metrics found (no validation CSV and no val_* "
                               "column in the loss logs)")
    blocks = []
    for stage, metrics in order_stages(validation).items():
        png = to_png(training_figures.metrics_figure(metrics))
        blocks.append(figure_html(png, f"validation metrics {stage}",
                                  f"Validation metrics per epoch, stage {stage}."))
    return blocks


def _examples_blocks(examples) -> list[str]:
    if not examples:
        raise ReportInputError("no example reconstructions were given or found "
                               f"({', '.join(TRAINING_FILES['examples'])})")
    png = to_png(training_figures.reconstruction_figure(examples))
    return [figure_html(png, "example reconstructions", "Mid-axial slices of the validation "
                        "participants' RISH maps: 3T source, model prediction, real 7T target; "
                        "one grey scale per row.")]


def _gate_blocks(gate) -> list[str]:
    """The group level's validation gate (``config["validation"]``,
    :mod:`bids_dmri_ldm.evaluation.gate`): the new model, identity, rish-global and the untouched
    3T scan on the held-out pairs, in the paper's 8 columns."""
    if not gate:
        raise ReportInputError("no validation table in the model (no held-out validation pair, or the "
                               "gate could not run: see the group level's log)")
    from bids_dmri_ldm.evaluation.gate import column_label

    columns = gate["columns"]
    rows = [[method, *("n/a" if values[c] is None else f"{values[c]:.4f}" for c in columns)]
            for method, values in gate["mean"].items()]
    losses = gate.get("loses_to_identity") or []
    verdict = (f"{gate['model']} LOSES to identity in {', '.join(column_label(c) for c in losses)}."
               if losses else f"{gate['model']} is not worse than identity in any column.")
    return [paragraph(f"{gate['n_participants']} held-out participant(s), against their real 7T scan, "
                      "mean over participants (NMSE lower is better, SSIM higher is better). " + verdict),
            table_html(rows, header=["method", *(column_label(c) for c in columns)])]


def _summary_blocks(data_summary) -> list[str]:
    if not data_summary:
        raise ReportInputError("no data summary was given or found in the model config")
    return [table_html(sorted(_flat(data_summary).items()), header=("item", "value"))]


def _config_blocks(config) -> list[str]:
    if not config:
        raise ReportInputError("no configuration was given or found")
    return [preformatted(json.dumps(config, indent=2, sort_keys=True, default=str))]


def _flat(mapping: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in mapping.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def render_training_report(
    path: str | Path,
    losses: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    validation: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    examples: Sequence[Mapping[str, np.ndarray]] | None = None,
    data_summary: Mapping | None = None,
    config: Mapping | None = None,
    logger: logging.Logger | None = None,
) -> Path:
    """Write the training report from in-memory data (no file is read).

    Parameters
    ----------
    path : path-like
        Output HTML (written atomically).
    losses : dict
        ``{stage: {column: values}}``, e.g. ``{"vqvae3t": {"epoch": ...,
        "train_loss": ..., "val_loss": ...}}``.
    validation : dict
        ``{stage: {column: values}}`` of validation metrics per epoch.
    examples : sequence of dict
        ``{"label", "source", "prediction", "target"}`` RISH volumes
        ``(X, Y, Z, n_orders)`` of validation participants.
    data_summary, config : dict
        Shown as a table and as JSON.

    Returns
    -------
    Path
    """
    logger = logger or LOGGER
    parts = [
        ("Validation gate: the model against identity on held-out pairs", _gate_blocks,
         (config or {}).get("validation")),
        ("Loss curves per stage", _losses_blocks, losses),
        ("Validation metrics per epoch", _validation_blocks, validation),
        ("Example reconstructions (validation participants)", _examples_blocks, examples),
        ("Training data", _summary_blocks, data_summary),
        ("Configuration", _config_blocks, config),
    ]
    sections: list[Section] = []
    for title, build, value in parts:
        section = report_section(title, build, value, logger=logger)
        section.level = 2
        sections.append(section)
    from bids_dmri_ldm import __version__

    subtitle = f"bids-dmri-ldm {__version__} · generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    return atomic_write_text(path, render_document("Group level: model training", sections, subtitle))


def build_training_report(
    output_dir: str | Path,
    losses: Mapping | None = None,
    validation: Mapping | None = None,
    examples: Sequence[Mapping] | None = None,
    data_summary: Mapping | None = None,
    config: Mapping | None = None,
    logger: logging.Logger | None = None,
) -> Path:
    """Write ``OUTPUT_DIR/group_training.html``.

    Arguments given are used as they are; the others are read from the files
    the group level left in ``output_dir`` (:data:`TRAINING_FILES`). The data
    summary defaults to the config's ``training_data`` / ``data_summary``
    entry. Never raises because an input is missing or malformed: the part
    shows the error message, and it is logged.

    Returns
    -------
    Path
        ``output_dir / "group_training.html"``.
    """
    logger = logger or LOGGER
    output_dir = Path(output_dir)
    problems = []

    def discover(role, loader):
        try:
            paths = _discover(output_dir, role)
            return loader(paths) if paths else None
        except Exception as exc:  # noqa: BLE001 - shown as a missing part, logged
            problems.append(f"{role}: {exc}")
            logger.warning("training report: cannot read %s: %s", role, exc)
            return None

    if losses is None:
        losses = discover("losses", load_curves)
    if validation is None:
        validation = discover("validation", load_curves)
    if not validation and losses:
        validation = validation_from_losses(losses)
    if config is None:
        config = discover("config", lambda paths: load_config(paths[0]))
    if examples is None:
        examples = discover("examples", load_examples)
    if data_summary is None and config:
        data_summary = next((config[k] for k in ("training_data", "data_summary", "data")
                             if isinstance(config.get(k), Mapping)), None)
    path = render_training_report(output_dir / "group_training.html", losses, validation,
                                  examples, data_summary, config, logger)
    if problems:
        logger.warning("training report written with problems: %s", "; ".join(problems))
    return path


__all__ = ["TRAINING_FILES", "build_training_report", "render_training_report"]

"""Group level: the validation gate of a newly trained model on the held-out participants.

The new model is scored beside identity, rish-global (fitted on the training participants) and
the untouched 3T scan (:mod:`bids_dmri_ldm.evaluation.gate`); the table is recorded in the bundle.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..methods import Method
from ..ml.rish_global import RishPair, fit_rish_global

if TYPE_CHECKING:  # pragma: no cover
    from ..bidsio.layout import DWIRun
    from ..config import RunConfig

LOGGER = logging.getLogger("bids_dmri_ldm.group")

from .group_features import feature_runs, shell_rish


def validation_pairs(config: RunConfig, runs: Sequence[DWIRun], labels: Sequence[str], shell: float) -> list:
    """:class:`~bids_dmri_ldm.evaluation.gate.ValidationPair` of each held-out participant: the
    3T and 7T runs training used, and the 3T run's cached RISH features of ``shell``."""
    from ..bidsio.layout import SOURCE, TARGET
    from ..evaluation.gate import ValidationPair

    chosen = feature_runs(runs)
    pairs = []
    for label in labels:
        source, target = chosen[SOURCE][label], chosen[TARGET][label]
        rish, mask, affine = shell_rish(source, config, shell)
        pairs.append(ValidationPair(label, source.session, source.dwi, source.bval, source.bvec,
                                    target.dwi, target.bval, target.bvec, rish, mask, affine))
    return pairs


def rish_global_baseline(config: RunConfig, runs: Sequence[DWIRun], labels: Sequence[str], shell: float):
    """``rish-global`` fitted on the given (training) participants' cached features of ``shell``."""
    from ..bidsio.layout import SOURCE, TARGET
    from ..methods import RishGlobalMethod

    chosen = feature_runs(runs)
    pairs = [RishPair(*shell_rish(chosen[SOURCE][p], config, shell), *shell_rish(chosen[TARGET][p], config, shell),
                      label=p) for p in labels]
    return RishGlobalMethod(fit_rish_global(pairs, shell=shell, sh_order_max=config.sh_order_max))


def run_gate(config: RunConfig, model_name: str, model, runs: Sequence[DWIRun], train_ids: Sequence[str],
             val_ids: Sequence[str], shell: float | None = None) -> dict[str, Any] | None:
    """Score the new ``model`` beside identity, rish-global (fitted on ``train_ids``) and the
    untouched 3T scan on the held-out ``val_ids`` (:mod:`bids_dmri_ldm.evaluation.gate`), on one
    shell (``shell``; default: the training shell).

    Returns the validation table, or None (with a warning) when there is no held-out participant or
    the gate cannot run; warns, naming the columns, when the model loses to identity.
    """
    from ..evaluation.gate import column_label, score_pair, summarise_rows
    from ..methods import IdentityMethod

    if not val_ids:
        LOGGER.warning("group: no held-out validation participant (need >= 2 pairs): the %s model is not "
                       "validated against identity", model_name)
        return None
    shell = config.training_shell if shell is None else float(shell)
    translators = {"identity": IdentityMethod()}
    try:
        if model_name != Method.RISH_GLOBAL.value:
            translators[Method.RISH_GLOBAL.value] = rish_global_baseline(config, runs, train_ids, shell)
        translators[model_name] = model
        rows = []
        for pair in validation_pairs(config, runs, val_ids, shell):
            LOGGER.info("group: validation gate, sub-%s", pair.participant)
            rows += score_pair(pair, translators, truth_root=config.bids_dir, shell=shell,
                               tolerance=config.shell_tolerance, sh_order_max=config.sh_order_max)
    except Exception as err:  # noqa: BLE001 - the gate informs; it never loses the trained model
        LOGGER.warning("group: the validation gate could not run (%s): the %s model is not validated", err, model_name)
        return None
    table = summarise_rows(rows, model_name)
    losses = table["loses_to_identity"]
    if losses:
        LOGGER.warning("group: the new %s model LOSES to identity on %d held-out participant(s) in %s; "
                       "see MODEL_CARD.md (participant runs with it will carry this warning)", model_name,
                       table["n_participants"], ", ".join(column_label(c) for c in losses))
    else:
        LOGGER.info("group: the new %s model is not worse than identity in any column on %d held-out "
                    "participant(s)", model_name, table["n_participants"])
    return table


def gate_bundle(config: RunConfig, method: Method, bundle_dir: Path | None, runs: Sequence[DWIRun]) -> None:
    """Run the gate on a freshly trained ldm/cnn bundle and record the table in it."""
    if bundle_dir is None:
        return
    from ..evaluation.gate import table_markdown
    from ..methods import load_method
    from ..ml.bundle import attach_validation

    model = load_method(method, bundle_dir, {"device": config.device, "seed": config.seed})
    data = model.bundle.config["training_data"]
    table = run_gate(config, method.value, model, runs, data["train_participants"],
                     data["validation_participants"])
    if table is not None:
        attach_validation(bundle_dir, table, table_markdown(table))

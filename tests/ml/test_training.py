"""Training stages: determinism, loss decrease, checkpoint/resume, the train_all entry point."""
import csv
import json

import numpy as np
import pytest
import torch

from bids_dmri_ldm.ml.bundle import load_bundle
from bids_dmri_ldm.ml.distributed import DistContext
from bids_dmri_ldm.ml.split import split_participants
from bids_dmri_ldm.ml.stageloop import best_epoch, fit_stage, kept_epoch
from bids_dmri_ldm.ml.training import (
    TrainingDataError,
    stage_settings,
    train_all,
    train_ldm,
    train_sr,
    train_vqvae,
)
from bids_dmri_ldm.ml.training_data import setup_training
from bids_dmri_ldm.reports.training import plot_losses

CPU = DistContext(0, 1, torch.device("cpu"))


def _volumes(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(-1, 1, 16).view(1, 1, 16, 1, 1) * torch.ones(1, 1, 16, 16, 16)
    return (base * torch.rand(n, 1, 1, 1, 1, generator=g) + 0.1 * torch.randn(n, 1, 16, 16, 16, generator=g))


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_vqvae_stage_is_deterministic_and_learns(tiny_cfg, tmp_path):
    tiny_cfg["training"]["lr"] = 2e-3
    tiny_cfg["training"]["epochs"]["vqvae3t"] = 4
    x = _volumes()
    m1, h1 = train_vqvae(x, tiny_cfg, tmp_path / "a", CPU)
    m2, h2 = train_vqvae(x, tiny_cfg, tmp_path / "b", CPU)
    assert [h["train_loss"] for h in h1] == [h["train_loss"] for h in h2]
    for k, v in _weights(m1).items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert h1[-1]["train_loss"] < 0.8 * h1[0]["train_loss"]


def test_resume_continues_exactly(tiny_cfg, tmp_path):
    z = torch.randn(6, 4, 4, 4, 4)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    tiny_cfg["training"]["epochs"]["ldm"] = 2
    straight, hist = train_ldm(z, labels, tiny_cfg, tmp_path / "straight", CPU)
    tiny_cfg["training"]["epochs"]["ldm"] = 1
    train_ldm(z, labels, tiny_cfg, tmp_path / "split", CPU)
    tiny_cfg["training"]["epochs"]["ldm"] = 2
    resumed, hist_r = train_ldm(z, labels, tiny_cfg, tmp_path / "split", CPU, resume=True)
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in hist_r]
    for k, v in straight.state_dict().items():
        assert torch.allclose(v, resumed.state_dict()[k], atol=1e-7), k


def test_sr_stage_learns_a_fixed_mapping(tiny_cfg, tmp_path):
    tiny_cfg["training"]["lr"] = 3e-3
    tiny_cfg["training"]["epochs"]["sr"] = 5
    x = _volumes(6)
    _, hist = train_sr(x, 0.8 * x + 0.1, tiny_cfg, tmp_path / "sr", CPU, log_dir=tmp_path / "log",
                       plot_losses=plot_losses)
    assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"]
    with open(tmp_path / "log" / "losses_sr.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5 and (tmp_path / "log" / "losses_sr.png").stat().st_size > 1000


def test_split_is_participant_level_and_seeded():
    ids = [f"sub-{i:02d}" for i in range(10)]
    train, val = split_participants(ids, 0.2, seed=3)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == ids
    assert split_participants(ids, 0.2, seed=3) == (train, val)
    assert split_participants(["a"], 0.2, 0) == (["a"], [])


def test_no_paired_participants_is_a_clear_error(tiny_cfg, tmp_path, rish_pairs):
    r3, r7 = rish_pairs
    r7 = {f"x{k}": v for k, v in r7.items()}
    with pytest.raises(TrainingDataError, match="no paired participants: found 5 with 3T .* 4 with 7T"):
        train_all(r3, r7, tiny_cfg, tmp_path / "out", tmp_path / "work")


def test_setup_training_splits_the_paired_participants_on_a_private_config(tiny_cfg, tmp_path, rish_pairs):
    r3, r7 = rish_pairs
    setup = setup_training(r3, r7, tiny_cfg, tmp_path / "out", tmp_path / "work", "cpu")
    assert sorted(setup.targets) == ["p0", "p1", "p2", "p3"]  # p4 has no 7T scan
    assert sorted(setup.train_ids + setup.val_ids) == sorted(setup.targets)
    assert (setup.train_ids, setup.val_ids) == split_participants(sorted(setup.targets),
                                                                  tiny_cfg["training"]["val_fraction"],
                                                                  tiny_cfg["training"]["seed"])
    assert (tmp_path / "work").is_dir() and setup.log_dir == tmp_path / "out" / "training"
    setup.cfg["translation"]["scale_gain"] = [0.5, 0.5, 0.5]  # the trainers record calibrations in it
    assert "scale_gain" not in tiny_cfg["translation"]


@pytest.mark.slow
def test_train_all_writes_a_loadable_bundle_and_resumes_by_stage(tiny_cfg, tmp_path, rish_pairs):
    r3, r7 = rish_pairs
    out = train_all(r3, r7, tiny_cfg, tmp_path / "out", tmp_path / "work", stages=("vqvae3t", "vqvae7t"))
    assert out is None and (tmp_path / "work" / "vqvae7t" / "state.json").is_file()
    with pytest.raises(TrainingDataError, match="ldm stage completed first"):
        train_all(r3, r7, tiny_cfg, tmp_path / "out", tmp_path / "work", stages=("sr",), resume=True)
    bundle_dir = train_all(r3, r7, tiny_cfg, tmp_path / "out", tmp_path / "work", stages=("ldm", "sr"),
                           resume=True, command="pytest")
    bundle = load_bundle(bundle_dir)
    data = bundle.config["training_data"]
    assert data["n_paired"] == 4 and data["unpaired_3t"] == ["p4"] and len(data["validation_participants"]) == 1
    assert bundle.config["latent_scale"] > 0
    cal = data["calibration"]
    assert len(cal["table"]) == 4 and all(len(row["mse"]) == 3 for row in cal["table"])
    for order in range(3):   # each order took its own best (t0, omega)
        best = min(cal["table"], key=lambda row: row["mse"][order])
        assert bundle.config["translation"]["t0"][order] == best["t0"]
        assert bundle.config["translation"]["guidance"][order] == best["guidance"]
    gains = cal["linear_gains"]
    assert bundle.config["translation"]["gain_7t"] == gains["gain_7t"]
    assert bundle.config["translation"]["gain_3t"] == gains["gain_3t"]
    assert all(np.isfinite(g) and g > 0 for g in gains["gain_7t"] + gains["gain_3t"])
    scale = cal["scale_smoothing"]  # chosen on the 1 validation pair, gains fitted on all 4 pairs
    assert (scale["n_pairs"], scale["n_fit_pairs"]) == (1, 4)
    translation = bundle.config["translation"]
    assert [translation[k] for k in ("scale_smoothing", "scale_strength", "scale_gain")] == \
        [scale["sigma"], scale["strength"], scale["gain"]]
    assert all(np.isfinite(g) and g > 0 for g in translation["scale_gain"])
    for stage in ("vqvae3t", "vqvae7t", "ldm", "sr"):
        assert (tmp_path / "out" / "training" / f"losses_{stage}.csv").is_file()
    assert "pytest" in (bundle_dir / "MODEL_CARD.md").read_text()


def test_linear_gains_follow_the_7t_level_and_ignore_it_for_3t(tiny_cfg, rish_pairs):
    """The 7T gain is the ratio of real to predicted 7T RISH brain means: scaling the real 7T
    RISH by k scales it by exactly k and leaves the 3T gain alone."""
    import copy

    from bids_dmri_ldm.ml.calibration import calibrate_linear_gains
    from bids_dmri_ldm.ml.data import RishScan
    from bids_dmri_ldm.ml.networks import build_all
    from bids_dmri_ldm.ml.normalise import fit_normalisation

    r3, r7 = rish_pairs
    ids = ["p0", "p1"]
    cfg = copy.deepcopy(tiny_cfg)
    cfg.update(normalisation=fit_normalisation([r3[i][0] for i in ids], [r3[i][1] for i in ids], cfg["orders"]),
               latent_scale=1.0)
    torch.manual_seed(0)
    nets = {k: v.eval() for k, v in build_all(cfg).items()}
    pairs = [(RishScan(*r3[i]), RishScan(*r7[i])) for i in ids]
    base = calibrate_linear_gains(nets, cfg, pairs, torch.device("cpu"))
    k = np.array([0.5, 2.0, 3.0], np.float32)
    scaled = calibrate_linear_gains(nets, cfg, [(s, t._replace(rish=t.rish * k)) for s, t in pairs],
                                    torch.device("cpu"))
    np.testing.assert_allclose(np.divide(scaled["gain_7t"], base["gain_7t"]), k, rtol=1e-5)
    np.testing.assert_allclose(scaled["gain_3t"], base["gain_3t"], rtol=1e-6)


# --------------------------------------------------------------------------- resume and fingerprints
def test_resume_continues_only_a_checkpoint_of_the_same_fingerprint(tiny_cfg, tmp_path, caplog):
    """A checkpoint trained from other settings/data is not continued: the stage starts again."""
    z = torch.randn(6, 4, 4, 4, 4)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    tiny_cfg["training"]["epochs"]["ldm"] = 2
    fresh, hist_fresh = train_ldm(z, labels, tiny_cfg, tmp_path / "fresh", CPU, fingerprint="b")
    tiny_cfg["training"]["epochs"]["ldm"] = 1
    train_ldm(z, labels, tiny_cfg, tmp_path / "work", CPU, fingerprint="a")
    tiny_cfg["training"]["epochs"]["ldm"] = 2
    with caplog.at_level("WARNING", logger="bids_dmri_ldm.ml.stageloop"):
        other, hist_other = train_ldm(z, labels, tiny_cfg, tmp_path / "work", CPU, resume=True, fingerprint="b")
    assert "training this stage again from its first epoch" in caplog.text
    assert [h["train_loss"] for h in hist_other] == [h["train_loss"] for h in hist_fresh]
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    assert state["fingerprint"] == "b" and len(state["history"]) == 2
    caplog.clear()
    tiny_cfg["training"]["epochs"]["ldm"] = 3   # the same fingerprint: continued, trained longer
    _, hist_more = train_ldm(z, labels, tiny_cfg, tmp_path / "work", CPU, resume=True, fingerprint="b")
    assert not caplog.text and len(hist_more) == 3
    assert [h["train_loss"] for h in hist_more[:2]] == [h["train_loss"] for h in hist_other]


def test_stage_settings_hold_what_shapes_each_stage_and_not_the_epochs(tiny_cfg):
    import copy

    changed = copy.deepcopy(tiny_cfg)
    changed["training"]["epochs"] = {k: 50 for k in changed["training"]["epochs"]}
    changed["training"]["calibrate_t0"] = [5]
    for stage in ("vqvae3t", "vqvae7t", "ldm", "sr"):
        assert stage_settings(changed, stage) == stage_settings(tiny_cfg, stage)
    changed["training"]["cfg_dropout"] = 0.3
    assert stage_settings(changed, "ldm") != stage_settings(tiny_cfg, "ldm")
    assert stage_settings(changed, "vqvae3t") == stage_settings(tiny_cfg, "vqvae3t")
    changed["sr"]["channels"] = 8
    assert stage_settings(changed, "sr") != stage_settings(tiny_cfg, "sr")
    changed["training"]["lr"] = 1.0
    assert stage_settings(changed, "vqvae3t") != stage_settings(tiny_cfg, "vqvae3t")


def test_changed_settings_or_data_are_not_taken_from_old_checkpoints(tiny_cfg, tmp_path, rish_pairs):
    """Earlier stages are reused only when trained from these settings and data."""
    import copy

    r3, r7 = rish_pairs
    work = tmp_path / "work"
    assert train_all(r3, r7, tiny_cfg, tmp_path / "out", work, stages=("vqvae3t", "vqvae7t")) is None
    other = copy.deepcopy(tiny_cfg)
    other["vqvae"]["commitment_cost"] = 0.5
    with pytest.raises(TrainingDataError, match="completed first \\(with these settings and data\\)"):
        train_all(r3, r7, other, tmp_path / "out", work, stages=("ldm",), resume=True)
    fewer = {k: v for k, v in r3.items() if k != "p4"}   # another training set
    with pytest.raises(TrainingDataError, match="completed first \\(with these settings and data\\)"):
        train_all(fewer, r7, tiny_cfg, tmp_path / "out", work, stages=("ldm",), resume=True)
    later = copy.deepcopy(tiny_cfg)   # a later stage's setting leaves the VQ-VAEs usable
    later["training"]["cfg_dropout"] = 0.3
    assert train_all(r3, r7, later, tmp_path / "out", work, stages=("ldm",), resume=True) is None
    assert (work / "ldm" / "state.json").is_file()


def test_normalisation_is_refitted_when_the_training_scans_change(tiny_cfg, tmp_path, rish_pairs):
    from bids_dmri_ldm.ml.data import RishScan
    from bids_dmri_ldm.ml.training_data import training_normalisation

    r3, _ = rish_pairs
    scans = [RishScan(*r3[k]) for k in sorted(r3)]
    path = tmp_path / "normalisation.json"
    first = training_normalisation(path, scans[:3], tiny_cfg, resume=False, write=True)
    assert "fitted_on" not in first and "fitted_on" in json.loads(path.read_text())
    assert training_normalisation(path, scans[:3], tiny_cfg, resume=True, write=True) == first
    refit = training_normalisation(path, scans[1:], tiny_cfg, resume=True, write=True)
    assert refit == training_normalisation(tmp_path / "fresh.json", scans[1:], tiny_cfg, resume=False, write=False)
    assert refit != first


class _Scalar(torch.nn.Module):
    """One parameter p, loss (p - target)^2: with AdamW at a fixed rate p walks from 0 towards the
    training target 1 through the validation target 0.5, so the validation loss is lowest mid-way."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, target):
        return ((self.p - target) ** 2).mean()


def _scalar_fit(tmp_path, select, epochs, resume=False):
    cfg = {"grid": [1, 1, 1], "training": {"lr": 0.1, "weight_decay": 0.0, "amp": False, "seed": 0,
                                           "select_epoch": select}}
    model = _Scalar()
    history = fit_stage("sr", model, [torch.ones(4)], lambda m, batch, idx, epoch: m(batch[0]), cfg, epochs, 4,
                        tmp_path / "stage", None, CPU, resume, [torch.full((4,), 0.5)])
    return model, history


def test_best_validation_keeps_the_epoch_with_the_lowest_validation_loss(tmp_path):
    model, history = _scalar_fit(tmp_path / "best", "best-validation", 12)
    val = [h["val_loss"] for h in history]
    best = best_epoch(history)
    assert best == int(np.argmin(val)) + 1 and 1 < best < 12 and val[-1] > val[best - 1]
    assert abs(float(model.p.detach()) - 0.5) ** 2 == pytest.approx(val[best - 1], abs=1e-6)
    assert kept_epoch(history, {"select_epoch": "best-validation"}) == {"epoch": best, "of": 12,
                                                                       "rule": "lowest validation loss"}
    last, history_last = _scalar_fit(tmp_path / "last", "last", 12)
    assert [h["val_loss"] for h in history_last] == val  # training itself is the same
    assert abs(float(last.p.detach()) - 0.5) ** 2 == pytest.approx(val[-1], abs=1e-6) and float(last.p.detach()) > float(model.p.detach())
    assert kept_epoch(history_last, {}) == {"epoch": 12, "of": 12, "rule": "last"}


def test_best_validation_survives_a_resume(tmp_path):
    straight, history = _scalar_fit(tmp_path / "straight", "best-validation", 12)
    _scalar_fit(tmp_path / "split", "best-validation", 4)  # stops before the best epoch
    resumed, history_r = _scalar_fit(tmp_path / "split", "best-validation", 12, resume=True)
    assert [h["val_loss"] for h in history_r] == [h["val_loss"] for h in history]
    assert float(resumed.p.detach()) == pytest.approx(float(straight.p.detach()), abs=1e-7)
    done, _ = _scalar_fit(tmp_path / "split", "best-validation", 12, resume=True)  # nothing left to train
    assert float(done.p.detach()) == pytest.approx(float(straight.p.detach()), abs=1e-7)


def test_best_epoch_ignores_epochs_without_a_validation_loss():
    rows = [{"epoch": 1, "val_loss": float("nan")}, {"epoch": 2, "val_loss": 0.3}, {"epoch": 3, "val_loss": 0.3}]
    assert best_epoch(rows) == 2 and best_epoch(rows[:1]) is None
    assert kept_epoch(rows[:1], {"select_epoch": "best-validation"})["rule"] == "last"

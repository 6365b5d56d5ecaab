"""Command-line parsing: values, defaults and the exit code of every bad argument."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bids_dmri_ldm import __version__
from bids_dmri_ldm import bundles
from bids_dmri_ldm import config as config_module
from bids_dmri_ldm.cli import parser as parser_module
from bids_dmri_ldm.cli.exitcodes import BidsAppError
from bids_dmri_ldm.cli.parser import _build_parser, parse_args
from bids_dmri_ldm.cli.values import load_filter_file, normalise_labels
from bids_dmri_ldm.cli.run import main
from bids_dmri_ldm.ml import device as device_module


@pytest.fixture
def bids_root(tmp_path) -> Path:
    """A folder that is a BIDS dataset as far as the parser checks (dataset_description.json)."""
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    return root


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(device_module, "cuda_available", lambda: False)


def _args(bids_root: Path, *extra: str, level: str = "participant") -> list[str]:
    out = bids_root.parent / "out"
    return [str(bids_root), str(out), level, *extra]


def _exit_code(argv) -> int:
    with pytest.raises((BidsAppError, SystemExit)) as info:
        parse_args(argv)
    err = info.value
    return err.code if isinstance(err, SystemExit) else err.exit_code


# --------------------------------------------------------------------------- good values
def test_defaults(bids_root, no_gpu):
    cfg = parse_args(_args(bids_root))
    assert cfg.bids_dir == bids_root.resolve()
    assert cfg.output_dir == (bids_root.parent / "out").resolve()
    assert cfg.analysis_level == "participant"
    assert cfg.work_dir == (bids_root.parent / "work").resolve()  # OUTPUT_DIR/../work
    assert cfg.output_dir.is_dir() and cfg.work_dir.is_dir()
    assert cfg.output_resolution == pytest.approx(1.05)
    assert (cfg.shells, cfg.shell_tolerance, cfg.sh_order_max) == (None, 100.0, 4)  # every shell
    assert cfg.output_gradients is None and cfg.training_shell == 1000.0
    assert cfg.device == "cpu"
    assert cfg.method == config_module.default_method()
    assert cfg.participant_labels == [] and cfg.session_labels == [] and cfg.bids_filters == {}
    assert cfg.nprocs >= 1 and 1 <= cfg.omp_nthreads <= min(8, cfg.nprocs)
    assert (cfg.overwrite, cfg.seed, cfg.verbose, cfg.stage) == (False, 0, 0, "all")
    assert cfg.skull_strip is False  # the output keeps every voxel by default
    json.dumps(cfg.to_dict())  # provenance-ready


def test_all_options(bids_root, tmp_path, no_gpu):
    model = tmp_path / "model"
    model.mkdir()
    train = tmp_path / "train.yaml"
    train.write_text("epochs: 1\n")
    cfg = parse_args(_args(
        bids_root,
        "--participant_label", "sub-01", "02", "--session-id", "ses-A", "B",
        "-w", str(tmp_path / "scratch"), "--nprocs", "3", "--omp-nthreads", "2",
        "--device", "cpu", "--precision", "bf16", "--method", "identity", "--model-dir", str(model),
        "--output-resolution", "native", "--shell", "2000", "1000", "--shell-tolerance", "50",
        "--sh-order", "6", "--overwrite", "--seed", "7", "-vv", "--skull-strip",
        "--num-samples", "4", "--ddim-steps", "20", "--t0", "100", "200", "300",
        "--guidance", "1.5", "2", "0", "--scale-reference", "input", "--scale-smoothing", "1.5",
        "--config", str(train), "--stage", "ldm", "--resume",
        "--reports-only", "--skip-bids-validation",
        "--bids-database-dir", str(tmp_path / "db"),
        level="group",
    ))
    assert cfg.participant_labels == ["01", "02"]
    assert cfg.session_labels == ["A", "B"]
    assert cfg.work_dir == (tmp_path / "scratch").resolve()
    assert (cfg.nprocs, cfg.omp_nthreads, cfg.device, cfg.method) == (3, 2, "cpu", "identity")
    assert cfg.model_dir == model.resolve() and cfg.train_config == train.resolve()
    assert cfg.output_resolution is None
    assert (cfg.shells, cfg.shell_tolerance, cfg.sh_order_max) == ([1000.0, 2000.0], 50.0, 6)
    assert (cfg.overwrite, cfg.seed, cfg.verbose, cfg.skull_strip) == (True, 7, 2, True)
    assert (cfg.num_samples, cfg.ddim_steps, cfg.t0, cfg.guidance) == (4, 20, [100, 200, 300],
                                                                        [1.5, 2.0, 0.0])
    assert (cfg.scale_reference, cfg.scale_smoothing, cfg.precision) == ("input", 1.5, "bf16")
    assert (cfg.stage, cfg.resume, cfg.reports_only, cfg.skip_bids_validation) == (
        "ldm", True, True, True)
    assert cfg.bids_database_dir == (tmp_path / "db").resolve() and cfg.bids_database_dir.is_dir()


def test_output_resolution_number(bids_root, no_gpu):
    assert parse_args(_args(bids_root, "--output-resolution", "1.25")).output_resolution == 1.25


@pytest.mark.parametrize(
    "values, expected",
    [
        (["01"], ["01"]),
        (["sub-01"], ["01"]),
        (["sub-01", "02", "01"], ["01", "02"]),
        (["sub-HCP+1"], ["HCP+1"]),
    ],
)
def test_participant_labels_with_or_without_prefix(values, expected):
    assert normalise_labels(values, "sub-") == expected


def test_session_labels_with_or_without_prefix():
    assert normalise_labels(["ses-1", "2"], "ses-") == ["1", "2"]


def test_label_file(bids_root, tmp_path, no_gpu):
    labels = tmp_path / "labels.txt"
    labels.write_text("# participants to run\nsub-01\n02 03  # same line\n\n")
    cfg = parse_args(_args(bids_root, "--participant-label", str(labels)))
    assert cfg.participant_labels == ["01", "02", "03"]


def test_filter_file_nested_and_flat(tmp_path):
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"dwi": {"acquisition": "3T", "run": None},
                                  "source": {"MagneticFieldStrength": 3},
                                  "target": {"session": ["7T", "7Tb"]}}))
    assert load_filter_file(nested) == {"dwi": {"acquisition": "3T", "run": None},
                                        "source": {"MagneticFieldStrength": 3},
                                        "target": {"session": ["7T", "7Tb"]}}
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"session": "3T", "reconstruction": "*"}))
    assert load_filter_file(flat) == {"dwi": {"session": "3T", "reconstruction": "*"}}


def test_filter_file_reaches_config(bids_root, tmp_path, no_gpu):
    path = tmp_path / "f.json"
    path.write_text('{"dwi": {"acquisition": "3T"}}')
    cfg = parse_args(_args(bids_root, "--bids-filter-file", str(path)))
    assert cfg.bids_filters == {"dwi": {"acquisition": "3T"}}


def test_default_method_is_chosen_in_one_place(tmp_path, monkeypatch):
    # ldm (with the shipped demo bundle, found in the models folders) is the default method.
    (tmp_path / "models" / "demo").mkdir(parents=True)
    (tmp_path / "models" / "demo" / "config.json").write_text("{}")
    monkeypatch.setattr(bundles, "shipped_models_dirs", lambda: [tmp_path / "models"])
    assert config_module.default_method() == "ldm"
    assert config_module.RunConfig(Path("."), Path("."), "participant", Path(".")).method == "ldm"
    assert bundles.find_shipped_model("demo") == tmp_path / "models" / "demo"


def test_models_env_variable_is_searched_first(tmp_path, monkeypatch):
    monkeypatch.setenv(bundles.MODELS_ENV, str(tmp_path))
    assert bundles.shipped_models_dirs()[0] == tmp_path


# --------------------------------------------------------------------------- bad values
def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as info:
        _build_parser().parse_args(["-h"])
    assert info.value.code == 0
    assert "--participant-label" in capsys.readouterr().out
    assert main(["--help"]) == 0


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"bids-dmri-ldm {__version__}" == "bids-dmri-ldm 0.1.0"


BAD_OPTIONS = [
    (["--nprocs", "0"], 64),
    (["--nprocs", "x"], 64),
    (["--omp-nthreads", "-1"], 64),
    (["--output-resolution", "0"], 64),
    (["--output-resolution", "-1.2"], 64),
    (["--output-resolution", "fine"], 64),
    (["--shell", "0"], 64),
    (["--shell"], 64),
    (["--shell", "1000", "1050"], 64),  # within the tolerance of each other: one shell
    (["--output-gradients", "/no/such/table.bval", "/no/such/table.bvec"], 66),
    (["--output-gradients", "only_one"], 64),
    (["--shell-tolerance", "nan"], 64),
    (["--sh-order", "3"], 64),
    (["--sh-order", "10"], 64),
    (["--device", "tpu"], 64),
    (["--method", "magic"], 64),
    (["--stage", "vae"], 64),
    (["--t0", "1", "2"], 64),
    (["--guidance", "a", "b", "c"], 64),
    (["--scale-reference", "ratio"], 64),
    (["--scale-smoothing", "-1"], 64),
    (["--scale-smoothing", "inf"], 64),
    (["--seed", "-3"], 64),
    (["--num-samples", "0"], 64),
    (["--no-such-option"], 64),
    (["--participant-label", "sub-0_1"], 64),
    (["--session-label", "ses-a.b"], 64),
    (["--participant-label", "/no/such/labels.txt"], 66),
    (["--model-dir", "/no/such/model"], 66),
    (["--config", "/no/such/train.yaml"], 66),
    (["--bids-filter-file", "/no/such/filter.json"], 66),
]


@pytest.mark.parametrize("extra, code", BAD_OPTIONS)
def test_bad_option_exit_code(bids_root, no_gpu, extra, code):
    assert _exit_code(_args(bids_root, *extra)) == code


@pytest.mark.parametrize("argv", [[], ["only_one"], ["a", "b"], ["a", "b", "participant", "extra"]])
def test_missing_or_extra_positionals_are_usage_errors(argv):
    assert _exit_code(argv) == 64


def test_unknown_analysis_level(bids_root):
    assert _exit_code(_args(bids_root, level="subject")) == 17


@pytest.mark.parametrize(
    "content, code",
    [
        ("{not json", 64),
        ("[1, 2]", 64),
        ("{}", 64),
        ('{"anat": {"acquisition": "x"}}', 64),
        ('{"dwi": {"acq": "3T"}}', 64),  # short entity name: error says 'acquisition'
        ('{"dwi": {"flavour": "x"}}', 64),
        ('{"dwi": {"suffix": "T1w"}}', 64),
        ('{"dwi": {"extension": ".nii"}}', 64),
        ('{"dwi": {"datatype": "anat"}}', 64),
        ('{"dwi": {"acquisition": {"nested": 1}}}', 64),
    ],
)
def test_bad_filter_file(bids_root, tmp_path, no_gpu, content, code):
    path = tmp_path / "filter.json"
    path.write_text(content)
    assert _exit_code(_args(bids_root, "--bids-filter-file", str(path))) == code


def test_short_entity_name_hint(tmp_path):
    path = tmp_path / "filter.json"
    path.write_text('{"dwi": {"acq": "3T"}}')
    with pytest.raises(BidsAppError, match="'acquisition' instead of 'acq'"):
        load_filter_file(path)


def test_output_dir_equal_to_bids_dir(bids_root):
    with pytest.raises(BidsAppError, match="same as bids_dir") as info:
        parse_args([str(bids_root), str(bids_root), "participant"])
    assert info.value.exit_code == 64


def test_output_dir_inside_bids_dir(bids_root):
    argv = [str(bids_root), str(bids_root / "derivatives" / "ldm"), "participant"]
    with pytest.raises(BidsAppError, match="inside bids_dir") as info:
        parse_args(argv)
    assert info.value.exit_code == 64
    assert not (bids_root / "derivatives").exists()  # nothing written into the input


def test_bids_dir_inside_output_dir(bids_root):
    argv = [str(bids_root), str(bids_root.parent), "participant", "-w", "/tmp/w"]
    with pytest.raises(BidsAppError, match="inside output_dir") as info:
        parse_args(argv)
    assert info.value.exit_code == 64


def test_work_dir_inside_bids_dir(bids_root):
    with pytest.raises(BidsAppError, match="work dir") as info:
        parse_args(_args(bids_root, "-w", str(bids_root / "work")))
    assert info.value.exit_code == 64
    assert not (bids_root / "work").exists()


def test_work_dir_inside_output_dir(bids_root):
    out = bids_root.parent / "out"
    assert _exit_code([str(bids_root), str(out), "participant", "-w", str(out / "w")]) == 64


def test_missing_bids_dir(tmp_path):
    with pytest.raises(BidsAppError, match="does not exist") as info:
        parse_args([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"])
    assert info.value.exit_code == 66


def test_unreadable_bids_dir_is_a_clear_missing_input(bids_root, tmp_path, monkeypatch):
    """A folder this user may not read (seen as uid 4242 in a container): exit 66, one line."""
    real_is_file = Path.is_file

    def is_file(self):
        if self.name == "dataset_description.json" and self.parent == bids_root:
            raise PermissionError(13, "Permission denied")
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    with pytest.raises(BidsAppError, match="cannot be read by this user") as info:
        parse_args([str(bids_root), str(tmp_path / "out"), "participant"])
    assert info.value.exit_code == 66


def test_bids_dir_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert _exit_code([str(tmp_path / "file"), str(tmp_path / "out"), "participant"]) == 66


def test_non_bids_dir(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(BidsAppError, match="dataset_description.json") as info:
        parse_args([str(tmp_path / "plain"), str(tmp_path / "out"), "participant"])
    assert info.value.exit_code == 66


def test_output_dir_cannot_be_created(bids_root, tmp_path, no_gpu):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a file where a folder is needed: fails even for root
    with pytest.raises(BidsAppError, match="cannot write to the output_dir") as info:
        parse_args([str(bids_root), str(blocker / "out"), "participant",
                    "-w", str(tmp_path / "w")])
    assert info.value.exit_code == 73


def test_work_dir_cannot_be_created(bids_root, tmp_path, no_gpu):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert _exit_code(_args(bids_root, "-w", str(blocker / "work"))) == 73


def test_device_cuda_without_gpu_is_refused_at_parse_time(bids_root, no_gpu):
    with pytest.raises(BidsAppError) as info:
        parse_args(_args(bids_root, "--device", "cuda"))
    assert info.value.exit_code == 64
    message = str(info.value)
    assert "--gpus all" in message and "--nv" in message and "--device cpu" in message


def test_device_auto_without_gpu_is_cpu(bids_root, no_gpu):
    assert parse_args(_args(bids_root, "--device", "auto")).device == "cpu"


def test_never_exits_2(bids_root, tmp_path, no_gpu):
    """argparse's reserved status 2 never leaks out, whatever is wrong."""
    cases = [extra for extra, _ in BAD_OPTIONS] + [["--device"], ["--t0"], ["-w"]]
    codes = {_exit_code(_args(bids_root, *extra)) for extra in cases}
    codes.add(_exit_code([]))
    assert 2 not in codes
    assert codes <= {64, 66}


def test_parser_builds_without_side_effects(tmp_path):
    parser = _build_parser()
    opts = parser.parse_args([str(tmp_path / "in"), str(tmp_path / "out"), "participant"])
    assert opts.analysis_level == "participant"
    assert not (tmp_path / "out").exists()  # building/parsing alone writes nothing


def test_parser_module_exposes_prog():
    assert parser_module.PROG == "bids-dmri-ldm"


def test_config_accepts_builtin_names_and_files(bids_root, tmp_path, no_gpu):
    cfg = parse_args(_args(bids_root, "--config", "paper"))
    assert cfg.train_config.name == "paper.json" and cfg.train_config.is_file()
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert parse_args(_args(bids_root, "--config", str(own))).train_config == own.resolve()
    with pytest.raises(BidsAppError) as err:
        parse_args(_args(bids_root, "--config", "nonexistent"))
    assert err.value.exit_code == 66


def _table(tmp_path, bvals, bvecs, name="t"):
    bval, bvec = tmp_path / f"{name}.bval", tmp_path / f"{name}.bvec"
    bval.write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    bvec.write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in np.asarray(bvecs).T) + "\n")
    return bval, bvec


def test_output_gradients_table_checked_at_parsing(bids_root, tmp_path, no_gpu, capsys):
    """A well-formed table is kept (absolute paths); an ill-formed one is a one-line usage error
    (64) naming the files and the problem: non-unit directions, a count mismatch between the two
    files, text that is not numbers."""
    dirs = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    bval, bvec = _table(tmp_path, [0, 1000, 1000, 2000], np.vstack([[0, 0, 0], dirs]))
    cfg = parse_args(_args(bids_root, "--output-gradients", str(bval), str(bvec)))
    assert cfg.output_gradients == (bval.resolve(), bvec.resolve())
    json.dumps(cfg.to_dict())
    cases = {
        "must be unit vectors": _table(tmp_path, [0, 1000, 1000, 2000], np.vstack([[0, 0, 0], 0.5 * dirs]), "short"),
        "bval file has 3 entries but the bvec file has 4": _table(tmp_path, [0, 1000, 1000],
                                                                  np.vstack([[0, 0, 0], dirs]), "count"),
    }
    words = tmp_path / "words.bval"
    words.write_text("zero thousand\n")
    cases["is not a table of numbers"] = (words, bvec)
    for fragment, (bad_bval, bad_bvec) in cases.items():
        capsys.readouterr()
        assert main(_args(bids_root, "--output-gradients", str(bad_bval), str(bad_bvec))) == 64
        err = capsys.readouterr().err.strip()
        assert fragment in err and "--output-gradients" in err and "\n" not in err, err

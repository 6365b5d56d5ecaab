"""Offline checks of the container and CI files (issue 5).

- ``hadolint`` passes on the Dockerfile (and does flag a known-bad one);
- ``.circleci/config.yml`` validates against CircleCI's schema (and a misspelled key does not);
- the Boutiques descriptor is valid and in sync with the command-line parser (flags, types,
  choices, lists, defaults, required positionals, version);
- the Dockerfile keeps every run-time write under /tmp (read-only root, any UID) and bakes in
  the model bundles; the example scripts and documented command lines use real options.

The image itself is built and run by ``.ci/container.sh`` (docker is not available to tests).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bids_dmri_ldm.cli.parser import ANALYSIS_LEVELS, _build_parser

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
CIRCLECI = REPO / ".circleci" / "config.yml"
DESCRIPTOR = REPO / "boutiques" / "bids-dmri-ldm.json"
EXAMPLES = sorted((REPO / "examples").glob("*.sh"))
CONTAINER_DOC = REPO / "docs" / "container.md"
VERSION = (REPO / "version").read_text().strip()


def _tool(name: str) -> str:
    """Path of a linter installed with the test extra (beside this Python, or on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install '.[test]' (it is in the test extra)")
    return found


def _run(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


# --------------------------------------------------------------------------- linters
def test_hadolint_passes_on_dockerfile():
    result = _run(_tool("hadolint"), DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    """The linter really lints: an unpinned base and `cd` in RUN are rejected."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN cd /tmp && apt-get install -y curl\n")
    result = _run(_tool("hadolint"), bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3003" in result.stdout


def test_circleci_config_matches_schema():
    result = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.circle-ci", CIRCLECI)
    assert result.returncode == 0, result.stdout + result.stderr


def test_circleci_schema_rejects_a_misspelled_key(tmp_path):
    text = CIRCLECI.read_text()
    assert "    steps:\n" in text
    bad = tmp_path / "config.yml"
    bad.write_text(text.replace("    steps:\n", "    stepz:\n", 1))
    result = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.circle-ci", bad)
    assert result.returncode != 0


def test_circleci_builds_tests_smokes_and_deploys_on_tags():
    text = CIRCLECI.read_text()
    for job in ("build:", "test:", "smoke:", "deploy:", "lint:"):
        assert f"\n  {job}\n" in text, job
    assert "bash .ci/container.sh" in text  # the same smoke test as .ci/run
    assert re.search(r"restore_cache:\s+keys:\s+- testdata-v\d+-\{\{ checksum ", text)
    assert "docker push" in text


# --------------------------------------------------------------------------- Boutiques
def _descriptor() -> dict:
    return json.loads(DESCRIPTOR.read_text())


def _parser_options() -> dict[str, argparse.Action]:
    """Parser actions by ``dest``, without --help and --version."""
    return {
        action.dest: action
        for action in _build_parser()._actions
        if not isinstance(action, (argparse._HelpAction, argparse._VersionAction))
    }


_REJECTED = object()


def _converts(action: argparse.Action, text: str) -> object:
    """The option's value for ``text``, or ``_REJECTED`` when its type refuses it."""
    try:
        return action.type(text)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return _REJECTED


def _boutiques_type(action: argparse.Action) -> str:
    """The Boutiques type an argparse option maps to."""
    if action.nargs == 0:
        return "Flag"
    if action.type is Path:
        return "String" if action.dest == "output_dir" else "File"
    if action.type is None:
        return "String"
    # A number type takes "2" and rejects words; one that also takes 'native' is a String.
    numeric = isinstance(_converts(action, "2"), (int, float))
    if numeric and _converts(action, "x") is _REJECTED and _converts(action, "native") is _REJECTED:
        return "Number"
    return "String"


def test_descriptor_is_valid_boutiques(tmp_path):
    from boutiques.validator import DescriptorValidationError

    from boutiques import bosh

    bosh(["validate", str(DESCRIPTOR)])  # raises DescriptorValidationError when invalid
    broken = _descriptor()
    broken["inputs"][0]["type"] = "Directory"  # not a Boutiques type
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(broken))
    with pytest.raises(DescriptorValidationError):
        bosh(["validate", str(bad)])


def test_descriptor_version_and_image_follow_version_file():
    desc = _descriptor()
    assert desc["tool-version"] == VERSION
    assert desc["container-image"]["image"].endswith(f":{VERSION}")
    assert desc["command-line"].split()[0] == "bids-dmri-ldm"


def test_descriptor_inputs_are_the_parser_options():
    desc_ids = [item["id"] for item in _descriptor()["inputs"]]
    assert sorted(desc_ids) == sorted(_parser_options())
    assert len(desc_ids) == len(set(desc_ids))


def _sync_problems(descriptor: dict) -> list[str]:
    """Differences between the descriptor's inputs and the parser's options."""
    options = _parser_options()
    problems = []
    for item in descriptor["inputs"]:
        action = options[item["id"]]
        where = f"{item['id']}:"
        if action.option_strings:
            if item.get("command-line-flag") not in action.option_strings:
                problems.append(f"{where} flag {item.get('command-line-flag')} not in "
                                f"{action.option_strings}")
            if not item.get("optional", False):
                problems.append(f"{where} option marked required")
        else:
            if "command-line-flag" in item or item.get("optional", False):
                problems.append(f"{where} positional must be required and have no flag")
        if item["type"] != _boutiques_type(action):
            problems.append(f"{where} type {item['type']} != {_boutiques_type(action)}")
        if item["type"] == "Number":
            integer = _converts(action, "2.5") is _REJECTED
            if item.get("integer", False) != integer:
                problems.append(f"{where} integer={item.get('integer')} but parser {integer}")
        is_list = action.nargs not in (None, 0, "?")
        if bool(item.get("list", False)) != is_list:
            problems.append(f"{where} list={item.get('list')} but nargs={action.nargs}")
        if isinstance(action.nargs, int) and action.nargs > 0:
            if (item.get("min-list-entries"), item.get("max-list-entries")) != (
                action.nargs, action.nargs
            ):
                problems.append(f"{where} list length must be exactly {action.nargs}")
        choices = list(ANALYSIS_LEVELS) if item["id"] == "analysis_level" else action.choices
        if choices and item.get("value-choices") != list(choices):
            problems.append(f"{where} value-choices {item.get('value-choices')} != {choices}")
        if not choices and "value-choices" in item:
            problems.append(f"{where} value-choices but the parser has none")
        default = action.default
        if default not in (None, False) and item["type"] != "Flag":
            expected = str(default) if item["type"] == "String" else default
            if item.get("default-value") != expected:
                problems.append(f"{where} default {item.get('default-value')!r} != {expected!r}")
        elif "default-value" in item:
            problems.append(f"{where} default-value but the parser has no default")
    return problems


def test_descriptor_inputs_match_parser_details():
    problems = _sync_problems(_descriptor())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("field, value", [
    ("command-line-flag", "--n-procs"), ("type", "String"), ("default-value", 3),
    ("value-choices", ["cpu", "cuda"]),
])
def test_sync_check_catches_a_stale_descriptor(field, value):
    """A renamed flag, changed type, default or choice list is reported."""
    desc = _descriptor()
    target = "device" if field == "value-choices" else "nprocs" if field != "default-value" else "seed"
    item = next(i for i in desc["inputs"] if i["id"] == target)
    item[field] = value
    assert any(p.startswith(f"{target}:") for p in _sync_problems(desc))


def test_descriptor_command_line_has_each_value_key_once_in_parser_order():
    desc = _descriptor()
    keys = re.findall(r"\[[A-Z0-9_]+\]", desc["command-line"])
    assert keys == [item["value-key"] for item in desc["inputs"]]
    positionals = [a.dest for a in _parser_options().values() if not a.option_strings]
    assert [item["id"] for item in desc["inputs"][: len(positionals)]] == positionals


def test_boutiques_renders_a_participant_command(tmp_path):
    """bosh turns an invocation into the command a user would type (flags, lists, values)."""
    from boutiques import bosh

    invocation = tmp_path / "invocation.json"
    invocation.write_text(json.dumps({
        "bids_dir": "/bids", "output_dir": "/out", "analysis_level": "participant",
        "participant_label": ["01", "02"], "nprocs": 2, "skip_bids_validation": True,
        "t0": [10, 20, 30],
    }))
    result = bosh(["exec", "simulate", str(DESCRIPTOR), "-i", str(invocation)])
    command = result.stdout if hasattr(result, "stdout") else str(result)
    argv = command.split("bids-dmri-ldm", 1)[1].split()
    opts = _build_parser().parse_args(argv)
    assert (str(opts.bids_dir), str(opts.output_dir), opts.analysis_level) == (
        "/bids", "/out", "participant")
    assert opts.participant_label == ["01", "02"] and opts.nprocs == 2
    assert opts.skip_bids_validation and opts.t0 == [10, 20, 30]


# --------------------------------------------------------------------------- Dockerfile
def _dockerfile_env() -> dict[str, str]:
    """ENV keys and values of the Dockerfile (``KEY=value`` forms, continuation lines joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def test_dockerfile_base_entrypoint_labels_and_torch_variants():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_VARIANT=cuda$", text, re.M)  # CUDA build by default
    assert 'ENTRYPOINT ["/opt/venv/bin/bids-dmri-ldm"]' in text
    assert 'org.opencontainers.image.version="${VERSION}"' in text
    assert "COPY models/ " in text
    # The CA bundle is a build secret, never copied into a layer.
    assert "--mount=type=secret,id=cacert" in text
    assert not re.search(r"^(COPY|ADD)\b.*(\.crt|\.pem|cacert)", text, re.M | re.I)
    # The default target (last stage) is the production image.
    assert re.findall(r"^FROM .* AS (\w+)$", text, re.M)[-1] == "production"


def test_dockerfile_points_every_runtime_write_at_tmp():
    env = _dockerfile_env()
    writable = ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR",
                "NIPYPE_CONFIG_DIR", "DENO_DIR", "NUMBA_CACHE_DIR", "TORCH_HOME",
                "TRITON_CACHE_DIR")
    for key in writable:
        assert env.get(key, "").startswith("/tmp"), key
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["NIPYPE_NO_ET"] == "1"  # no etelemetry request at import (no network)
    from bids_dmri_ldm.bundles import MODELS_ENV

    assert env[MODELS_ENV] == "/opt/bids-dmri-ldm/models"


def test_dockerignore_sends_only_what_the_image_needs():
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"  # allow-list
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert {"bids_dmri_ldm", "models", "pyproject.toml", "version"} <= allowed
    assert not allowed & {".venv", ".git", ".docker-ci", "demo", "work"}


# --------------------------------------------------------------------------- scripts and docs
@pytest.mark.parametrize("script", [*EXAMPLES, REPO / ".ci" / "container.sh"],
                         ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    result = _run("bash", "-n", script)
    assert result.returncode == 0, result.stderr


def _app_arguments(text: str) -> list[list[str]]:
    """Arguments after '<bids_dir> <output_dir> participant|group' in the command lines of
    ``text`` (continuation lines joined; a command ends at a newline or shell operator)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    pattern = r"\S*/\S*[ \t]+\S*/\S*[ \t]+(?:participant|group)((?:[ \t]+[^\s|;&>`)]+)*)"
    return [match.group(1).split() for match in re.finditer(pattern, joined)]


def test_examples_and_docs_use_real_options():
    options = _build_parser()._option_string_actions
    sources = [*EXAMPLES, CONTAINER_DOC]
    checked = 0
    for source in sources:
        for args in _app_arguments(source.read_text()):
            for token in args:
                if token.startswith("-") and token != "-":
                    flag = token.split("=", 1)[0]
                    assert flag in options, f"{source.name}: unknown option {flag}"
                    checked += 1
    assert checked >= 10  # the examples and docs do pass options


# --------------------------------------------------------------------------- issue 14
def test_image_records_its_own_tag():
    """The IMAGE_TAG build argument becomes BIDS_DMRI_LDM_IMAGE, which the app writes as
    GeneratedBy.Container.Tag (bidsio/dataset.py container_info)."""
    text = DOCKERFILE.read_text()
    assert re.search(r'^ARG IMAGE_TAG=""$', text, re.M)
    assert _dockerfile_env()["BIDS_DMRI_LDM_IMAGE"] == "${IMAGE_TAG}"
    from bids_dmri_ldm.bidsio import dataset

    assert '"BIDS_DMRI_LDM_IMAGE"' in Path(dataset.__file__).read_text()
    ci = (REPO / ".ci" / "container.sh").read_text()
    assert '--build-arg "IMAGE_TAG=$IMAGE"' in ci
    assert "IMAGE_TAG=<< pipeline.parameters.image >>:$version" in CIRCLECI.read_text()


def test_ci_builds_and_smoke_tests_the_cuda_image_unless_skipped():
    ci = (REPO / ".ci" / "container.sh").read_text()
    assert re.search(r'^VARIANTS=\$\{BDL_VARIANTS:-cpu cuda\}$', ci, re.M)
    assert 'BDL_SKIP_CUDA:-0}" = 1 ]; then VARIANTS=${VARIANTS//cuda/}' in ci
    assert '--build-arg "TORCH_VARIANT=$VARIANT"' in ci and "check_cuda_disk" in ci
    circle = CIRCLECI.read_text()
    assert "\n  smoke-cuda:\n" in circle and "BDL_VARIANTS=cuda" in circle
    assert "requires: [lint, test, smoke, smoke-cuda]" in circle


def _docker_run_commands(text: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line[line.index("docker run"):] for line in joined.splitlines() if "docker run" in line]


def test_documented_docker_runs_that_write_pass_the_user():
    """Every documented `docker run` that mounts a folder runs as the caller (-u), so outputs
    are not owned by root."""
    sources = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *EXAMPLES]
    checked = 0
    for source in sources:
        for command in _docker_run_commands(source.read_text()):
            if " -v " not in command:
                continue
            checked += 1
            assert re.search(r"(^|\s)(-u|--user)\s", command), f"{source.name}: {command}"
    assert checked >= 6

# bids-dmri-ldm developer entry points.
#   make demo   - create .venv, install, simulate a small BIDS dataset, run the participant level
#   make test   - create .venv if needed, install the test extra, check the import contracts
#                 (pyproject.toml [tool.importlinter]), run the test suite
#   make bench  - run the benchmarks (not part of the tests)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= demo
NPROC  ?= 2

.PHONY: demo test bench venv clean

$(VENV)/.installed: pyproject.toml version
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,ci]'
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -n $(NPROC) -q -ra

demo: $(VENV)/.installed
	rm -rf $(DEMO)
	$(PY) -m bids_dmri_ldm.simulate $(DEMO)/bids --subjects 1 --voxel-scale 3 --seed 2024
	$(PY) run.py $(DEMO)/bids $(DEMO)/out participant -w $(DEMO)/work --skip-bids-validation
	@echo "Demo outputs are in $(DEMO)/out (7T-like DWI under $(DEMO)/out/sub-*/)"

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_sh_fit.py

clean:
	rm -rf $(DEMO) .pytest_cache build *.egg-info

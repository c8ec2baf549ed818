# dsjax entry points. Two commands on a fresh machine:
#   make run    -- create .venv (Python >= 3.12), install dsjax, run the default job (train `tiny` on CPU)
#   make test   -- create .venv, install dsjax[test,hf], run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= tiny
PYTEST_ARGS ?= -n 2

.PHONY: venv run inspect test test-all goldens clean

$(VENV)/.installed: setup.py pyproject.toml
	@set -e; PYBIN=$$(tools/find_python.sh); echo "using $$PYBIN"; \
	  $$PYBIN -m venv $(VENV); \
	  $(PY) -m pip install --upgrade pip >/dev/null; \
	  $(PY) -m pip install -e ".[test,hf]"
	@touch $@

venv: $(VENV)/.installed

WORKDIR ?= workdirs/$(CONFIG)

run: venv
	$(PY) -m experiments.train --config=$(CONFIG) --workdir=$(WORKDIR)
	$(PY) -m experiments.plot --workdir=$(WORKDIR)

# Parameter table + forward pass of a model preset (any size: big ones are counted, not allocated).
inspect: venv
	$(PY) -m experiments.main --config=$(CONFIG)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS) tests

# Slow tests included (still CPU only).
test-all: venv
	$(PY) -m pytest $(PYTEST_ARGS) -m "not gpu" --runslow tests

# Regenerates tests/goldens with torch + transformers 5.24 (a separate Python 3.11 venv; see DEVELOPERS.md).
goldens:
	tools/make_goldens.sh

clean:
	rm -rf $(VENV) .pytest_cache

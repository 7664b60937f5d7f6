# Two commands for a researcher arriving cold: `make quickstart` and `make test`.
# Both create .venv with Python >= 3.12 (found on PATH or under pyenv) on first use.
VENV := .venv
PY := $(VENV)/bin/python
# Dev-machine CPUs: 2 workers keep the suite inside CI's 2 cores.
PYTEST_WORKERS ?= 2

$(PY):
	@py=$$(for c in python3.13 python3.12 python3 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[2-9]*/bin/python3 2>/dev/null); do \
	  command -v $$c >/dev/null 2>&1 && $$c -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo $$c; break; }; \
	done); \
	if [ -z "$$py" ]; then echo "Python >= 3.12 not found (jax >= 0.11 needs it)"; exit 1; fi; \
	echo "creating $(VENV) with $$py"; $$py -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'

.PHONY: setup test lint quickstart
setup: $(PY)

lint: $(PY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) -q -rs tests

quickstart: $(PY)
	$(PY) -m experiments.train --config=configs/quickstart.py --workdir=runs/quickstart

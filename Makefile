# bayesnoise: `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-slow demo lint notebooks bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[app,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/bayesnoise run configs/digits.yaml --out runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check bayesnoise tests
	$(VENV)/bin/ruff format --check bayesnoise tests

clean:
	rm -rf $(VENV) runs .pytest_cache

notebooks: $(STAMP)
	BAYESNOISE_SMALL=$${BAYESNOISE_SMALL:-1} $(PY) notebooks/run_all.py

# bayesnoise: `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs
PYTEST_ARGS ?=

.PHONY: install test test-slow demo lint notebooks bench clean docs docs-check

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

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

# The site in docs/_build/html (open docs/_build/html/index.html): every page is built again
# and the notebooks run in their small mode on every build; any warning fails it.
docs: $(DOCS_STAMP)
	$(VENV)/bin/sphinx-build -E -W --keep-going -b html docs docs/_build/html

# The built site: every public name has its anchor, every notebook page shows a figure.
docs-check: $(DOCS_STAMP)
	$(PY) docs/check_html.py docs/_build/html

clean:
	rm -rf $(VENV) runs .pytest_cache docs/_build docs/jupyter_execute

notebooks: $(STAMP)
	BAYESNOISE_SMALL=$${BAYESNOISE_SMALL:-1} $(PY) notebooks/run_all.py

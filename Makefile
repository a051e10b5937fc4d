# Two entry points for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: serve test install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,milvus]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/vpr serve --demo

test: $(STAMP)
	@bash .ci/install-browser.sh || echo "note: Chromium not installed; the browser tests will be skipped"
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) var

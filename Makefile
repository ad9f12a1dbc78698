# `make demo` installs everything and runs the embedded default end to end;
# `make test` installs everything and runs the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser demo test bench clean settings-example

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the CPU build first so that nothing later pulls a CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/cllama-deploy quickstart --out demo-out

test: browser install
	$(BIN)/python -m pytest -q

# Debian's chromium for the chat-page test (tests/server/test_browser.py; Playwright drives it and never
# downloads a browser): installed here when missing and running as root, otherwise one line says how.
CHROMIUM_HOW := make test needs Debian's chromium for tests/server/test_browser.py: run 'sudo apt-get install chromium' (or make test as root) and retry
browser:
	$(if $(shell command -v chromium 2>/dev/null),@true,$(if $(filter 0,$(shell id -u)),apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium,$(error $(CHROMIUM_HOW))))

# server/settings.example.yaml is generated from the settings model (tests/test_cli.py checks it).
settings-example: install
	$(BIN)/cllama-deploy serve --print-settings chinese-alpaca-7b=/srv/models/chinese-alpaca-7b-q4_k_m.gguf \
	    chinese-alpaca-2-7b=/srv/models/chinese-alpaca-2-7b-q4_k_m.gguf > server/settings.example.yaml

clean:
	rm -rf $(VENV) demo-out .pytest_cache

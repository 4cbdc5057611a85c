# Set-up and everyday commands.  `make demo` and `make test` work on a fresh clone:
# each creates (or reuses) .venv and installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test test-all compile check-generated clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pinned first so the CPU build on disk is used, not a multi-GB CUDA download
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m lopt_gen.demo

test: install
	$(PY) -m pytest -q -m "not slow" -n 2 $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

compile: install
	$(VENV)/bin/lopt-gen compile

check-generated: install
	$(VENV)/bin/lopt-gen compile --check

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis out

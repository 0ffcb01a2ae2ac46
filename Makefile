# The two commands of the README: `make demo` and `make test`. Both set up the machine first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean-lab
setup:
	@scripts/setup.sh

demo: setup
	$(VENV)/bin/accel lab demo

lint: setup
	$(VENV)/bin/ruff check accel sockops_bpf xds certs bench tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-lab: setup
	$(VENV)/bin/accel lab down --all

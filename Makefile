# The two commands of the README: `make demo` and `make test`. Both set up the machine first.
# `make e2e`: a real single-node Kubernetes (no kube-proxy) with meshaccel installed from deploy/ (tests/e2e).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean-lab e2e
setup:
	@scripts/setup.sh

demo: setup
	$(VENV)/bin/accel lab demo

lint: setup
	$(VENV)/bin/ruff check accel sockops_bpf meshxds certs bench tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

e2e: setup
	scripts/e2e/run.sh

clean-lab: setup
	$(VENV)/bin/accel lab down --all

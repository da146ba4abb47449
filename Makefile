# limitpal_tasks — developer commands. `make test` is all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: test lint typecheck pytest services bench demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

services:
	bash scripts/ensure-services.sh redis rabbitmq

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP) services
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

bench: $(STAMP) services
	$(PY) benchmarks/run.py

demo: $(STAMP)
	$(VENV)/bin/limitpal-tasks demo $(if $(BROKER),--broker $(BROKER)) $(if $(STORE),--store $(STORE))

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build dist benchmarks/results

.PHONY: scenarios
scenarios: $(STAMP) services  # real workers, limitpal_tasks vs baselines; writes benchmarks/results/ and README's Why
	cd benchmarks && timeout 900 ../$(PY) -m scenarios $(SCENARIO_ARGS)

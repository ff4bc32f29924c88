# The two commands a user needs: `make run` and `make test`. Both build .venv
# from the pinned constraints on first use, so a fresh clone needs nothing else.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DATA ?= data/synth
STAMP := $(VENV)/.installed

.PHONY: install run stop test lint data validate bench bento-requirements clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	$(BIN)/mtlrec data synth --out $(DATA)

validate: $(STAMP)
	$(BIN)/mtlrec validate $(DATA)

# Whole workflow: data, Prefect server + deployments + worker, one pipeline run, the service, one request.
# Its Prefect server keeps its state in the checkout unless PREFECT_HOME says otherwise.
run stop: export PREFECT_HOME ?= $(CURDIR)/.mtlrec/prefect
run: $(STAMP)
	$(BIN)/mtlrec up --data $(DATA)

stop: $(STAMP)
	$(BIN)/mtlrec down

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/vulture

# services/requirements.txt, what the bento installs: services/requirements.in at the pins of constraints.txt.
bento-requirements: $(STAMP)
	$(BIN)/python -m services.pins

bench: $(STAMP)
	$(BIN)/python benchmarks/data_pipeline.py

clean: stop
	rm -rf data/synth data/movielens gx_output .pytest_cache .ruff_cache .mtlrec reports artifacts

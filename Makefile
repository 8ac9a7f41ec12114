# Two commands for a fresh machine: `make smoke` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU machines pin the torch wheel kept on disk; with a GPU driver present nothing is pinned, so a
# CUDA torch already in the environment is kept.
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")
SMOKE_ARGS ?=

.PHONY: install smoke test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(CONSTRAINTS) -e '.[dev,eval]'
	@if [ "$$(id -u)" = 0 ] && ! command -v slurmctld >/dev/null 2>&1; then \
	  echo "installing slurm-wlm and munge for the SLURM tests"; \
	  (apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && \
	    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1)) || \
	  echo "slurm-wlm could not be installed: SLURM tests will skip"; \
	fi
	touch $(STAMP)

# A fresh run each time (the tokenizer and token shards stay cached under ~/.cache/ofs_scale).
smoke: install
	rm -rf runs/smoke
	$(BIN)/ofs-scale train --config configs/smoke.yaml $(SMOKE_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install lint
	$(BIN)/python -m pytest -q

bench: install
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

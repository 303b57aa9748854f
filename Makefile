# nanochat on Slurm. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build installs fast from a local file here; on a GPU cluster use e.g. TORCH_SPEC=torch (CUDA build).
TORCH_SPEC ?= torch==2.13.0
PIPELINE ?= pipelines/smoke.yaml
REHEARSE ?= artemis-a100
EXECUTOR ?= auto
RUN ?=
PYTEST_ARGS ?= --durations=25
# pytest-xdist workers: the Slurm tests mostly wait on the scheduler while the others compute, so two
# workers use a 2-core machine better than one; a test module runs whole, in order, on one worker
# (--dist loadfile; not loadgroup: xdist 3.8 does not group on pytest 9.2). PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
PYTEST_XDIST = $(if $(filter 0,$(PYTEST_WORKERS)),-p no:xdist,-n $(PYTEST_WORKERS) --dist loadfile)
STAMP := $(VENV)/.installed

.PHONY: help setup sandbox pipeline rehearse lint test test-fast report bench gpu-check slurm-up slurm-down clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'
	@echo "  variables: PIPELINE=$(PIPELINE) EXECUTOR=$(EXECUTOR) (auto|slurm|local) RUN=<run id> REHEARSE=$(REHEARSE) TORCH_SPEC=$(TORCH_SPEC)"
	@echo "  see also: python -m jobs submit PIPELINE --dry-run | status RUN --watch | logs RUN [STAGE] --follow"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

setup: $(STAMP) ## bootstrap .venv (idempotent; fast when done)

sandbox: ## install bubblewrap (HumanEval's sandbox) with apt where it is missing and this is root
	@command -v bwrap >/dev/null && exit 0; \
	 if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	   DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap >/dev/null 2>&1 || \
	   { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap >/dev/null; }; \
	 fi; command -v bwrap >/dev/null || { echo "bubblewrap (bwrap) not installed: HumanEval will be refused" >&2; \
	   [ "$${CI:-}" != "true" ]; }

pipeline: setup ## run a pipeline (default: the CPU smoke pipeline; locally when no Slurm is found)
	$(PY) -m jobs submit $(PIPELINE) --executor $(EXECUTOR) --wait

rehearse: setup ## run a pipeline (REHEARSE, default artemis-a100) as shipped, scaled down, on the local two-node Slurm, hub on 127.0.0.1
	bash sbatch/slurm_local.sh up
	$(PY) -m jobs rehearse $(REHEARSE)

lint: setup ## ruff (pyflakes-class errors, pyproject.toml [tool.ruff]): the first step of make test, in seconds
	$(PY) -m ruff check .

test: setup lint sandbox ## run the test suite on 2 xdist workers, 25 slowest printed (brings up the local Slurm; required when CI=true)
	@if [ "$${CI:-}" = "true" ]; then bash sbatch/slurm_local.sh up; \
	 else bash sbatch/slurm_local.sh up || echo "local Slurm not available: slurm tests will be skipped"; fi
	$(PY) -m pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

test-fast: setup lint ## the unit tests only (no Slurm, nothing marked slow)
	$(PY) -m pytest -m "not slurm and not slow" $(PYTEST_XDIST) $(PYTEST_ARGS)

report: setup ## build the report of RUN=<run id> (or the latest run)
	$(PY) -m jobs report $(if $(RUN),$(RUN),--latest)

bench: setup ## benchmark each optimization against its baseline on this machine
	$(PY) -m jobs bench all

gpu-check: ## every GPU path, short (a 300 s wall, not yet run on a GPU): a JSON line per check, the last final; skips without CUDA
	@$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m jobs gpu-check $(if $(OUT_JSON),--out $(OUT_JSON),)

slurm-up: ## start a real two-node Slurm (with accounting) on localhost (slurm_local.sh up --nodes N for more)
	bash sbatch/slurm_local.sh up

slurm-down: ## stop the local Slurm
	bash sbatch/slurm_local.sh down

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache

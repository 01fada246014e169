# cd4ml — two commands: `make up` (install, start the embedded stack, run the demo) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WAIT ?= 300

.PHONY: up down status logs test test-fast test-scale test-zoo test-compose lint typecheck bench bench-scale soak clean install chromium prometheus

install: $(STAMP)

# Re-install only when the pins change; the editable install makes `import cd4ml` work everywhere.
# uv installs the same pins as pip would (same constraints, same resolved set) in about a third of
# the time, downloads in parallel and byte-compiles up front; UV_NATIVE_TLS: the system's CA store,
# as pip uses it. pip stays in the venv (the compose wheelhouse is built with `pip wheel`).
UV_VERSION := 0.13.9
UV := UV_NATIVE_TLS=1 $(BIN)/uv pip install --python $(BIN)/python --quiet
$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml dev/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "uv==$(UV_VERSION)"
	$(UV) --compile-bytecode -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(UV) --no-deps -e . -e dev
	@touch $(STAMP)

up: $(STAMP)
	$(BIN)/cd4ml-dev stack up --wait $(WAIT)

down: $(STAMP)
	$(BIN)/cd4ml-dev stack down

status: $(STAMP)
	$(BIN)/cd4ml-dev stack status

logs:
	tail -n 50 .cd4ml/logs/*.log

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The system test drives the Airflow UI in Debian's chromium (Playwright never downloads a browser here).
chromium:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# A real Prometheus server, promtool (alert rule tests) and Alertmanager from Debian's packages, for
# the alert tests and `CD4ML_PROMETHEUS=1 make up` (docs/monitoring.md). Installed only when missing;
# no recommends (prometheus-node-exporter would be a second daemon nobody asked for).
prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v prometheus-alertmanager >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    prometheus prometheus-alertmanager >/dev/null; }

# Every test: lint, types, DAG integrity, unit, dag.test() integration, the system tests and the
# dataset zoo's quick five. CI then runs `make test-compose` (the Celery topology on real containers).
# pytest-xdist runs test files side by side (one file per worker, so module fixtures stay shared):
# most of a system test's time is spent waiting on servers, so more workers than cores still help.
# mypy runs beside pytest (whose first minute mostly waits for servers to start); both must pass.
TEST_WORKERS ?= 4
test: $(STAMP) chromium prometheus lint
	@mkdir -p .cd4ml; $(BIN)/mypy > .cd4ml/mypy.log 2>&1 & typecheck=$$!; \
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --durations=30; tests=$$?; \
	wait $$typecheck; types=$$?; echo "mypy:"; cat .cd4ml/mypy.log; \
	[ $$tests -eq 0 ] && [ $$types -eq 0 ]

# docker-compose.yaml's services as local processes: CeleryExecutor on this machine's PostgreSQL and
# Redis, two workers, MLflow on PostgreSQL, the prediction service (README "Scaling out").
test-scale: $(STAMP)
	$(BIN)/pytest -m scale tests/scale

# docker-compose.yaml under a real Docker engine: installs and starts one if missing (stopping only
# what it started), builds the images without a registry, then health, Celery training, serving,
# --scale, secrets, scheduler restart and down/up on real containers (scripts/compose/test.sh).
test-compose: $(STAMP)
	scripts/compose/test.sh

# Every dataset of the zoo with its large tables capped (make test trains the ones marked `quick`);
# refreshes tests/zoo/results/capped.json for DATASETS.md (benchmarks/zoo_table.py). ~15 min.
test-zoo: $(STAMP)
	CD4ML_ZOO=all CD4ML_ZOO_RESULTS=tests/zoo/results/capped.json $(BIN)/pytest tests/zoo/test_zoo.py

test-fast: $(STAMP)
	$(BIN)/pytest tests/dags tests/unit

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# The slow runs (tens of minutes): faults on a real embedded stack (SIGKILL mid-training, 5 files
# with the schedule, whole-stack restart mid-run), the whole bad-data corpus in one landing, the long
# variants make test leaves out (a deploy retry that succeeds, the full schemathesis fuzz, the live
# loop through dag.test()), the system test's labelled-week phase, the dataset
# zoo with its large tables whole (refreshes DATASETS.md), and the service under 60 s of load with 3 swaps.
soak: $(STAMP)
	CD4ML_SOAK=1 $(BIN)/pytest tests/reliability/test_faults_stack.py tests/reliability/test_bad_data.py
	CD4ML_SOAK=1 $(BIN)/pytest -n 2 --dist loadfile tests/reliability/test_faults.py \
	  tests/reliability/test_bad_requests.py tests/integration/test_monitor_live.py
	CD4ML_SOAK=1 $(BIN)/pytest tests/system/test_embedded_stack.py
	CD4ML_SOAK=1 CD4ML_ZOO_RESULTS=tests/zoo/results/full.json $(BIN)/pytest tests/zoo/test_zoo.py
	$(BIN)/python benchmarks/zoo_table.py
	$(BIN)/python benchmarks/bench_load.py --duration 60 --swaps 3 --concurrency 12

# 4 models x 4 batches on LocalExecutor vs CeleryExecutor with 1 and 2 workers (BENCHMARKS.md).
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/bench_scale.py

clean: $(STAMP)
	$(BIN)/cd4ml-dev stack clean

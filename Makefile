# Every target sets up what it needs: a fresh machine with only Python can run them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test native lint typecheck unit bench scenarios faults validate clean services services-stop image image-test lock manifests

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

## make run: payswitch on rules/ against simulated gateways on 127.0.0.1:9101-9105
run: $(STAMP)
	$(BIN)/payswitch validate rules
	@trap 'kill $$sim 2>/dev/null' EXIT INT TERM; \
	$(BIN)/payswitch sim --rules rules & sim=$$!; \
	sleep 1; \
	$(BIN)/payswitch run --rules rules --listen 127.0.0.1:8080 --admin 127.0.0.1:9901

validate: $(STAMP)
	$(BIN)/payswitch validate rules

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench deploy
	$(BIN)/ruff format --check proxy tests bench deploy

typecheck: $(STAMP)
	$(BIN)/mypy

## make services: Redis, promtool, Chromium, kustomize and the Kafka broker, when missing
services: $(STAMP)
	.ci/services

## make services-stop: stop the Redis and the Kafka broker `make services` started (a bench
## run beside them shares the CPU with them)
services-stop:
	.ci/services-stop

## make native: the request path compiled with mypyc into .build/native (what the image
## ships); rebuilt only when a source changed. Run it: PYTHONPATH=.build/native payswitch run
native: $(STAMP)
	$(BIN)/python deploy/native/build.py

# The native pass leaves out what runs no compiled code (packaging, manifests, the image,
# the browser tests of the dashboard's page, the service scripts).
NATIVE_SKIP := --ignore=tests/integration/test_deploy.py --ignore=tests/integration/test_kubernetes.py \
  --ignore=tests/integration/test_packaging.py --ignore=tests/integration/test_dashboard_live.py \
  --ignore=tests/integration/test_services_stop.py \
  -m "not image"

## make test: every check, the image built and run included; warnings fail. The suite
## runs twice: on the sources, then on the native build.
test: lint typecheck validate services native
	$(BIN)/pytest -q
	PAYSWITCH_NATIVE=1 PYTHONPATH=$(CURDIR)/.build/native \
	  $(BIN)/pytest -q -o pythonpath=".build/native ." -p no:cacheprovider $(NATIVE_SKIP)

## make image: the container image, built with buildah on a local debootstrap'd base
image:
	deploy/docker/build-image

## make image-test: only the image's tests (make test runs them too): build it, then run it
## as Kubernetes does (podman, read-only root filesystem, uid 10001)
image-test: $(STAMP)
	$(BIN)/pytest -q -m image

## make lock: regenerate the image's hashed lock after changing dependencies
lock: $(STAMP)
	$(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	  --extra otlp --custom-compile-command "make lock" \
	  --output-file deploy/docker/requirements.lock pyproject.toml deploy/docker/build-requirements.in

## make manifests: regenerate what deploy/kubernetes derives from other files
manifests: $(STAMP)
	$(BIN)/python deploy/prometheus/prometheusrule.py > deploy/kubernetes/base/prometheusrule.yaml

bench: $(STAMP) native
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench/out .build

## make reload-bench: write-to-serving latency of a rules reload, and losses in a reload storm
reload-bench: $(STAMP)
	$(BIN)/python bench/reload_bench.py

.PHONY: reload-bench

## make scenarios: failover under faults (shared/ANCHORS.md), ~5 min; bench/scenarios.py --quick ~2 min
scenarios: $(STAMP)
	$(BIN)/python bench/scenarios.py

## make payment-faults: double charges and what payswitch flags, per after_ambiguous policy;
## then the latency cost of the idempotency layer (memory and Redis stores)
payment-faults: $(STAMP)
	$(BIN)/python bench/payment_faults.py
	$(BIN)/python bench/idempotency_bench.py

## make soak: 30 min of mixed payments through faults, reload storms and a Redis restart
soak: $(STAMP) native
	$(BIN)/python bench/soak.py --minutes $(or $(MINUTES),30)

.PHONY: scenarios payment-faults soak

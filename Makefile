# Every target sets up what it needs: a fresh machine with only Python can run them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test lint typecheck unit bench scenarios faults validate clean

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
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

## make test: every check; warnings fail
test: lint typecheck validate
	if [ -x .ci/kafka/start ]; then .ci/kafka/start; fi
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench/out

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
soak: $(STAMP)
	$(BIN)/python bench/soak.py --minutes $(or $(MINUTES),30)

.PHONY: scenarios payment-faults soak

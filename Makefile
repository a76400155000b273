# The two commands that matter:
#   make run    sluice with config/sluice.toml in front of the local RabbitMQ
#   make test   the whole test suite (Rust unit + integration, Python clients)
# Both install and start what they need (Rust targets, RabbitMQ, a Python venv) on a fresh machine.

CARGO_TARGET_DIR ?= $(CURDIR)/target
export CARGO_TARGET_DIR
VENV ?= $(CURDIR)/.venv

# make test-broker-wide  the broker-wide tests (flood drill, broker faults), alone
.PHONY: test-broker-wide run test test-rust test-python broker venv lint plugins test-plugins test-drill test-faults

run: broker plugins
	cargo build --release -p sluice
	$(CARGO_TARGET_DIR)/release/sluice run -c config/sluice.toml

test: broker venv plugins test-plugins
	cargo build -p sluice
	cargo test --workspace
	SLUICE_BIN=$(CARGO_TARGET_DIR)/debug/sluice $(VENV)/bin/python -m pytest -q tests/python
	$(MAKE) test-redis-faults

# Tests that change state every other test shares (RabbitMQ's memory watermark, its application
# stopped and started): run alone, after `make test`, on a machine nothing else is loading.
test-broker-wide: test-faults test-drill

broker:
	.ci/ensure-rabbitmq
	.ci/ensure-redis
	.ci/ensure-tools

venv:
	.ci/python-venv $(VENV)

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# Policy plugins (their own workspace, built for wasm32-wasip2) into plugins/dist/.
PLUGINS_TARGET_DIR ?= $(CARGO_TARGET_DIR)/plugins

plugins:
	rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
	cd plugins && CARGO_TARGET_DIR=$(PLUGINS_TARGET_DIR) cargo build --release --target wasm32-wasip2
	mkdir -p plugins/dist
	cp $(PLUGINS_TARGET_DIR)/wasm32-wasip2/release/*.wasm plugins/dist/

# The SDK's and the example policies' own tests, run natively.
test-plugins:
	cd plugins && CARGO_TARGET_DIR=$(PLUGINS_TARGET_DIR) cargo test

# The flood drill, shortened, as a test (benches/drill), on RabbitMQ and on Redis. It lowers
# RabbitMQ's memory watermark and Redis's maxmemory (always restored), so it runs alone, after
# everything else, with the release build the drill uses.
test-drill: broker venv plugins
	cargo build --release -p sluice
	SLUICE_BIN=$(CARGO_TARGET_DIR)/release/sluice $(VENV)/bin/python -m pytest -q -m broker_wide tests/python/test_drill.py

# Broker faults (tests/tests/broker_faults.rs): RabbitMQ's application stopped and started under
# load, its memory alarm raised. They change the broker every test shares, so they run alone, one
# at a time, after everything else; without SLUICE_BROKER_FAULTS=1 they skip themselves. The
# broker is always put back (application started, watermark restored), even when a test fails.
test-faults: broker
	SLUICE_BROKER_FAULTS=1 cargo test -p sluice-tests --test broker_faults -- --test-threads=1

# Global quotas with Redis stopped and paused mid-run (tests/tests/global_quota.rs). Stopping Redis
# is state every Redis user on the machine shares, so the test runs alone and skips itself without
# SLUICE_REDIS_FAULTS=1; a guard restarts Redis with the README's command even when it fails.
.PHONY: test-redis-faults
test-redis-faults:
	SLUICE_REDIS_FAULTS=1 cargo test -p sluice-tests --test global_quota redis_outage_falls_back_as_configured_and_recovers -- --exact --test-threads=1

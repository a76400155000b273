# The two commands that matter:
#   make run    sluice with config/sluice.toml in front of the local RabbitMQ
#   make test   the whole test suite (Rust unit + integration, Python clients)
# Both install and start what they need (Rust targets, RabbitMQ, a Python venv) on a fresh machine.

CARGO_TARGET_DIR ?= $(CURDIR)/target
export CARGO_TARGET_DIR
VENV ?= $(CURDIR)/.venv

.PHONY: run test test-rust test-python broker venv lint

run: broker
	cargo build --release -p sluice
	$(CARGO_TARGET_DIR)/release/sluice run -c config/sluice.toml

test: broker venv
	cargo build -p sluice
	cargo test --workspace
	SLUICE_BIN=$(CARGO_TARGET_DIR)/debug/sluice $(VENV)/bin/python -m pytest -q tests/python

broker:
	.ci/ensure-rabbitmq

venv:
	.ci/python-venv $(VENV)

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

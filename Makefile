# segment-sync: build, test, demo, benchmarks.
#
#   make deps     system packages the build needs (cmake, a C compiler, OpenSSL headers, Java, Maven,
#                 Python's YAML module), and promtool unpacked into .cache/bin (no Prometheus server)
#   make test     the whole suite: unit, property, mock-cluster and real-broker tests
#   make lint     rustfmt and clippy, warnings as errors; promtool on the alert rules and the
#                 dashboard's queries (scripts/check-monitoring.py)
#   make demo     everything embedded, nothing to install beyond the toolchain
#   make bench    throughput and memory benchmarks (release build)
#   make fuzz     each fuzz target for a bounded time (nightly, cargo-fuzz; see mk/fuzz.mk)
#   make kafka    an Apache Kafka broker on 127.0.0.1:9092 in the foreground

include mk/kafka.mk
include mk/bench.mk
include mk/fuzz.mk

CARGO ?= cargo

.PHONY: all build test lint demo deps azurite

all: build

build:
	$(CARGO) build --release

deps:
	bash scripts/install-deps.sh

test: kafka-jars azurite
	$(CARGO) test

# Azurite (the Azure Storage emulator) from npm, pinned, for the snapshot tests.
azurite:
	bash tests/azurite/fetch.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	python3 scripts/check-monitoring.py

demo:
	$(CARGO) run --release -- demo

# Benchmarks for docs/design.md's "Performance targets". Included by the top-level
# Makefile. Each benchmark is a release binary that prints its figures and exits non-zero
# when a target is missed; `make bench` runs them all (no fail-fast) and fails if any did.
# Figures and how to read them: docs/benchmarks.md.
#
#   make bench              all of the below
#   make bench-hot-path     decode → window → batch encode, one core (JSON, avro-confluent)
#   make bench-memory       bytes a pending user holds in the window
#   make bench-backlog      peak resident memory of a worker catching up with a backlog
#   make bench-braze-rate   share of a Braze rate limit kept busy, and 429s
#   make bench-writes       attribute writes against the minimum
#   make bench-e2e          the worker against a plain consumer on a real Kafka broker
#   make bench-verify       verify of a 1/100 sample of 1,000,000 events: time and memory
#   make bench-restore      restore on assignment of 1,000,000 records; startup with nothing to restore
#   make bench-replay-fold  a backfill's fold of 1,000,000 changes: CPU, memory, the floor
#   make bench-snapshot     snapshot: 1,000,000 members unchanged in time, 10,000,000 in memory

CARGO ?= cargo
BENCH_FLAGS ?=

.PHONY: bench bench-hot-path bench-memory bench-backlog bench-braze-rate bench-writes bench-e2e \
	bench-verify bench-restore bench-replay-fold bench-snapshot

bench: kafka-jars
	$(CARGO) bench --no-fail-fast $(BENCH_FLAGS) \
		--bench hot_path --bench window_memory --bench attribute_writes \
		--bench braze_rate --bench end_to_end --bench backlog_memory --bench verify_sample \
		--bench restore --bench replay_fold --bench snapshot

bench-hot-path:
	$(CARGO) bench $(BENCH_FLAGS) --bench hot_path

bench-memory:
	$(CARGO) bench $(BENCH_FLAGS) --bench window_memory

bench-backlog: kafka-jars
	$(CARGO) bench $(BENCH_FLAGS) --bench backlog_memory

bench-braze-rate:
	$(CARGO) bench $(BENCH_FLAGS) --bench braze_rate

bench-writes:
	$(CARGO) bench $(BENCH_FLAGS) --bench attribute_writes

bench-e2e: kafka-jars
	$(CARGO) bench $(BENCH_FLAGS) --bench end_to_end

bench-verify:
	$(CARGO) bench $(BENCH_FLAGS) --bench verify_sample

bench-restore:
	$(CARGO) bench $(BENCH_FLAGS) --bench restore

bench-replay-fold:
	$(CARGO) bench $(BENCH_FLAGS) --bench replay_fold

bench-snapshot: kafka-jars
	$(CARGO) bench $(BENCH_FLAGS) --bench snapshot

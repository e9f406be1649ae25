# make fuzz: each fuzz target of fuzz/ for FUZZ_SECONDS (60) on the nightly toolchain, cargo-fuzz
# installed on first use. A crash leaves its input in fuzz/artifacts/<target>/; it becomes a
# test in tests/fuzz_regressions.rs.
#
# make fuzz-check: CI's bounded pass: builds every target and runs each over its seeds and
# what earlier runs kept (fuzz/corpus), no new inputs, so it cannot turn red by chance; the
# exploring runs are `make fuzz`'s. Not in `make test`: the sanitizer build of the dependency
# tree (librdkafka included) takes minutes.
#
#   make fuzz FUZZ_SECONDS=600 FUZZ_TARGETS=confluent

FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= json avro confluent registry_answer braze_classify \
	source_adobe_rtcdp source_segment source_lytics source_debezium
FUZZ_TOOLCHAIN ?= +nightly

.PHONY: fuzz fuzz-check fuzz-tools

fuzz-tools:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked

fuzz: fuzz-tools
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t && \
		$(CARGO) $(FUZZ_TOOLCHAIN) fuzz run $$t fuzz/corpus/$$t fuzz/seeds/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 || exit 1; \
	done

fuzz-check: fuzz-tools
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t && \
		$(CARGO) $(FUZZ_TOOLCHAIN) fuzz run $$t fuzz/corpus/$$t fuzz/seeds/$$t -- \
			-runs=0 || exit 1; \
	done

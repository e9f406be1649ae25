# A local Apache Kafka broker (KRaft, single node) for trying segment-sync by hand.
# Included by the top-level Makefile; every variable may be overridden on the command
# line, e.g. `make kafka KAFKA_PORT=19092`.
#
#   make kafka-jars   fetch the broker's jars from Maven Central (once)
#   make kafka        run the broker in the foreground on 127.0.0.1:$(KAFKA_PORT)
#   make kafka-reset  throw away the broker's topics and offsets
#
# With the broker running: tests/kafka/cli.sh topics --list (see cli.sh for more).

# Resolved where this file is included, so paths hold whatever directory make runs in.
KAFKA_MK_ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))..)

KAFKA_SCRIPTS ?= $(KAFKA_MK_ROOT)/tests/kafka
KAFKA_LIBS ?= $(KAFKA_MK_ROOT)/.cache/kafka/libs
KAFKA_DATA_DIR ?= $(KAFKA_MK_ROOT)/.cache/kafka/data
KAFKA_PORT ?= 9092
KAFKA_CONTROLLER_PORT ?= 9093
KAFKA_LOG_LEVEL ?= WARN

.PHONY: kafka-jars kafka kafka-reset

kafka-jars:
	KAFKA_LIBS='$(KAFKA_LIBS)' bash '$(KAFKA_SCRIPTS)/fetch-jars.sh'

kafka: kafka-jars
	KAFKA_LIBS='$(KAFKA_LIBS)' KAFKA_DATA_DIR='$(KAFKA_DATA_DIR)' \
	KAFKA_PORT='$(KAFKA_PORT)' KAFKA_CONTROLLER_PORT='$(KAFKA_CONTROLLER_PORT)' \
	KAFKA_LOG_LEVEL='$(KAFKA_LOG_LEVEL)' \
	bash '$(KAFKA_SCRIPTS)/broker.sh'

kafka-reset:
	rm -rf '$(KAFKA_DATA_DIR)'

#!/usr/bin/env bash
# Runs a single-node Apache Kafka broker (KRaft: broker and controller in one process)
# in the foreground, for trying segment-sync by hand (`make kafka`). Ctrl-C stops it;
# the data survives in $KAFKA_DATA_DIR until `make kafka-reset`.
#
#   KAFKA_PORT             client port on 127.0.0.1          (9092)
#   KAFKA_CONTROLLER_PORT  KRaft controller port             (9093)
#   KAFKA_DATA_DIR         properties, log dirs              (<repo>/.cache/kafka/data)
#   KAFKA_LIBS             jars from fetch-jars.sh           (<repo>/.cache/kafka/libs)
#   KAFKA_LOG_LEVEL        broker log level on stderr        (WARN)
#   KAFKA_HEAP_OPTS        JVM heap                          (-Xms128m -Xmx512m)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
port="${KAFKA_PORT:-9092}"
controller_port="${KAFKA_CONTROLLER_PORT:-9093}"
data="${KAFKA_DATA_DIR:-$root/.cache/kafka/data}"
libs="${KAFKA_LIBS:-$root/.cache/kafka/libs}"
level="${KAFKA_LOG_LEVEL:-WARN}"
heap="${KAFKA_HEAP_OPTS:--Xms128m -Xmx512m}"

if [[ ! -f "$libs/.complete" ]]; then
    KAFKA_LIBS="$libs" bash "$here/fetch-jars.sh"
fi

mkdir -p "$data/logs"
props="$data/server.properties"
# Rewritten on every start so a changed port applies to existing data: the static
# controller.quorum.voters keeps no endpoint in the formatted log dir.
cat >"$props" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$data/logs
num.partitions=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
PROPS

# Fast JVM start: a broker for one developer needs neither C2 nor a parallel GC.
jvm=($heap -XX:+UseSerialGC -XX:TieredStopAtLevel=1
     -Dlog4j2.configurationFile="$here/log4j2.properties" -Dkafka.log.level="$level")

if [[ ! -f "$data/logs/meta.properties" ]]; then
    # An id starting with "-" would be read by the tool as an option: draw again.
    cluster_id="-"
    while [[ "$cluster_id" == -* ]]; do
        cluster_id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')"
    done
    java "${jvm[@]}" -cp "$libs/*" kafka.tools.StorageTool format \
        -t "$cluster_id" -c "$props" >/dev/null
fi

echo "kafka: broker on 127.0.0.1:$port (controller 127.0.0.1:$controller_port), data in $data" >&2
exec java "${jvm[@]}" -cp "$libs/*" kafka.Kafka "$props"

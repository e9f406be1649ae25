#!/usr/bin/env bash
# The Kafka command-line tools against the local broker (`make kafka`), without a Kafka
# download: cli.sh TOOL [ARGS...]. --bootstrap-server is added unless given.
#
#   cli.sh topics --list
#   cli.sh topics --create --topic segment-changes --partitions 3
#   cli.sh console-consumer --topic segment-sync-dlq --from-beginning --property print.headers=true
#   cli.sh console-producer --topic segment-changes
#   cli.sh consumer-groups --describe --group segment-sync
#   cli.sh get-offsets --topic segment-changes
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
libs="${KAFKA_LIBS:-$root/.cache/kafka/libs}"
bootstrap="127.0.0.1:${KAFKA_PORT:-9092}"

usage() {
    echo "usage: cli.sh {topics|console-consumer|console-producer|consumer-groups|get-offsets} [ARGS...]" >&2
    exit 2
}
[[ $# -ge 1 ]] || usage
case "$1" in
    topics) class=org.apache.kafka.tools.TopicCommand ;;
    console-consumer) class=org.apache.kafka.tools.consumer.ConsoleConsumer ;;
    console-producer) class=org.apache.kafka.tools.ConsoleProducer ;;
    consumer-groups) class=org.apache.kafka.tools.consumer.group.ConsumerGroupCommand ;;
    get-offsets) class=org.apache.kafka.tools.GetOffsetShell ;;
    *) usage ;;
esac
shift

if [[ ! -f "$libs/.complete" ]]; then
    KAFKA_LIBS="$libs" bash "$here/fetch-jars.sh"
fi

args=("$@")
if [[ " $* " != *" --bootstrap-server "* ]]; then
    args=(--bootstrap-server "$bootstrap" "${args[@]}")
fi
exec java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$here/log4j2.properties" \
    -cp "$libs/*" "$class" "${args[@]}"

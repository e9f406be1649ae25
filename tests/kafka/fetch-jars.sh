#!/usr/bin/env bash
# Copies Apache Kafka (the broker) and its runtime jars from Maven Central into
# $KAFKA_LIBS (default: <repo>/.cache/kafka/libs), for `make kafka` and the
# integration tests. Idempotent: a marker written after a complete copy, holding the
# pom's checksum, makes later runs return at once, and a changed pom fetches again.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
libs="${KAFKA_LIBS:-$root/.cache/kafka/libs}"
pom="$here/pom.xml"
marker="$libs/.complete"

want="$(sha256sum "$pom" | cut -d' ' -f1)"
if [[ -f "$marker" && "$(cat "$marker")" == "$want" ]]; then
    exit 0
fi

command -v mvn >/dev/null || { echo "fetch-jars: mvn (Maven 3) is needed to fetch the Kafka jars" >&2; exit 1; }

parent="$(dirname "$libs")"
mkdir -p "$parent"
# Two test binaries may ask at once: one fetches, the other waits and then sees the marker.
exec 9>"$parent/.fetch.lock"
flock 9
if [[ -f "$marker" && "$(cat "$marker")" == "$want" ]]; then
    exit 0
fi

# Copy into a scratch dir and swap it in, so a broken download never looks complete.
tmp="$(mktemp -d "$parent/.libs.XXXXXX")"
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
echo "fetch-jars: copying Kafka jars into $libs" >&2
# Maven's output is shown only when it fails: even -q prints colour codes.
if ! mvn -B -q -Dstyle.color=never -f "$pom" dependency:copy-dependencies \
    -DoutputDirectory="$tmp" -DincludeScope=runtime >"$tmp/.mvn.log" 2>&1; then
    cat "$tmp/.mvn.log" >&2
    echo "fetch-jars: mvn failed" >&2
    exit 1
fi
rm -f "$tmp/.mvn.log"
# kafka.Kafka and kafka.tools.StorageTool share the kafka_2.13 jar: running the tool
# once proves the copied classpath is whole.
if ! java -cp "$tmp/*" kafka.tools.StorageTool random-uuid >/dev/null 2>&1; then
    echo "fetch-jars: the copied jars cannot run kafka.tools.StorageTool" >&2
    exit 1
fi
echo "$want" > "$tmp/.complete"
rm -rf "$libs"
mv "$tmp" "$libs"
trap - EXIT

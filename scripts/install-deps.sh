#!/usr/bin/env bash
# Installs what building and testing segment-sync needs from Debian's packages, when it is
# missing: a C toolchain and CMake (librdkafka is built from source), OpenSSL's headers
# (TLS and SASL to Kafka), zlib's headers, and Java 17 with Maven (the Apache Kafka broker of
# the end-to-end tests), Node.js with npm (Azurite, the Azure Storage emulator of the snapshot
# tests), and for `make lint` promtool (Debian ships it in the prometheus
# package) with Python's YAML module (scripts/check-monitoring.py). Rust itself comes from
# rustup.
set -euo pipefail

need=()
command -v cc >/dev/null || need+=(build-essential)
command -v cmake >/dev/null || need+=(cmake)
command -v pkg-config >/dev/null || need+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
dpkg -s zlib1g-dev >/dev/null 2>&1 || need+=(zlib1g-dev)
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
# Azurite, the Azure Storage emulator of the snapshot tests, comes from npm.
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
# scripts/check-monitoring.py runs under the python3 on PATH, else Debian's.
has_yaml() {
  local py
  for py in python3 /usr/bin/python3; do
    "$py" -c 'import yaml' >/dev/null 2>&1 && return 0
  done
  return 1
}
has_yaml || need+=(python3-yaml)
need_promtool=false
command -v promtool >/dev/null || need_promtool=true

if [ ${#need[@]} -eq 0 ] && ! $need_promtool; then
  echo "install-deps: everything is already installed"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
if $need_promtool; then
  echo "install-deps: installing prometheus (for promtool)"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus
  # Only promtool is wanted: the package also starts a Prometheus server where systemd runs.
  if [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "install-deps: installing ${need[*]}"
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"

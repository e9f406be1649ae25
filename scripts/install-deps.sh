#!/usr/bin/env bash
# Installs what building and testing segment-sync needs, when it is missing. From Debian's
# packages: a C toolchain and CMake (librdkafka is built from source), pkg-config, OpenSSL's
# and zlib's headers (TLS, SASL and compression to Kafka), Java 17 with Maven (the Apache
# Kafka broker of the end-to-end tests), Node.js with npm (Azurite, the Azure Storage emulator
# of the snapshot tests, comes from npm) and Python's YAML module (scripts/check-monitoring.py,
# in `make lint`). Rust itself comes from rustup.
#
# `make lint` also needs promtool. Debian ships it only inside the prometheus package, whose
# installation enables and starts a Prometheus server: a build step must not leave one on a
# workstation. So that package is never installed: its .deb is downloaded and promtool alone
# is unpacked from it into .cache/bin/ (PROMTOOL_DIR), where `make lint` looks first.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
promtool_dir="${PROMTOOL_DIR:-$root/.cache/bin}"

# Unpacks promtool from Debian's prometheus package into $1 without installing the package:
# no service, no user, no maintainer scripts run. Needs current apt lists.
fetch_promtool() {
  local dir="$1" sandbox=()
  # Removed however the script ends, a failed download included.
  fetch_work="$(mktemp -d)"
  trap 'rm -rf "$fetch_work"' EXIT
  # As root, apt hands downloads to its _apt user, which cannot write into a private temporary
  # directory; it then downloads as root anyway, with a warning. Say so up front instead.
  [ "$(id -u)" -ne 0 ] || sandbox=(-o APT::Sandbox::User=root)
  (cd "$fetch_work" && apt-get download -qq "${sandbox[@]}" prometheus)
  dpkg-deb -x "$fetch_work"/prometheus_*.deb "$fetch_work/root"
  mkdir -p "$dir"
  install -m 0755 "$fetch_work/root/usr/bin/promtool" "$dir/promtool"
  "$dir/promtool" --version >/dev/null
  echo "install-deps: promtool unpacked into $dir (the prometheus package is not installed)"
}

main() {
  local need=() need_promtool=false
  command -v cc >/dev/null || need+=(build-essential)
  command -v cmake >/dev/null || need+=(cmake)
  command -v pkg-config >/dev/null || need+=(pkg-config)
  dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
  dpkg -s zlib1g-dev >/dev/null 2>&1 || need+=(zlib1g-dev)
  command -v java >/dev/null || need+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || need+=(maven)
  command -v node >/dev/null || need+=(nodejs)
  command -v npm >/dev/null || need+=(npm)
  has_yaml || need+=(python3-yaml)
  [ -x "$promtool_dir/promtool" ] || command -v promtool >/dev/null || need_promtool=true

  if [ ${#need[@]} -eq 0 ] && ! $need_promtool; then
    echo "install-deps: everything is already installed"
    return 0
  fi
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  if [ ${#need[@]} -gt 0 ]; then
    echo "install-deps: installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
  fi
  if $need_promtool; then
    fetch_promtool "$promtool_dir"
  fi
}

# scripts/check-monitoring.py runs under the python3 on PATH, else Debian's.
has_yaml() {
  local py
  for py in python3 /usr/bin/python3; do
    "$py" -c 'import yaml' >/dev/null 2>&1 && return 0
  done
  return 1
}

# Sourced (to try fetch_promtool alone), it only defines the functions.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi

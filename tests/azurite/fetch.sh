#!/usr/bin/env bash
# Installs Azurite (Microsoft's Azure Storage emulator) from the npm registry into
# $AZURITE_DIR (default: <repo>/.cache/azurite), for the snapshot tests that read a Customer
# Insights export from Blob Storage. The version is pinned; a marker holding it, written after
# a complete install, makes later runs return at once.
set -euo pipefail

VERSION=3.35.0
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dir="${AZURITE_DIR:-$root/.cache/azurite}"
marker="$dir/.complete"

if [[ -f "$marker" && "$(cat "$marker")" == "$VERSION" ]]; then
    exit 0
fi
command -v npm >/dev/null || { echo "azurite: npm (Node.js) is needed; run scripts/install-deps.sh" >&2; exit 1; }

mkdir -p "$(dirname "$dir")"
exec 9>"$(dirname "$dir")/.azurite.lock"
flock 9
if [[ -f "$marker" && "$(cat "$marker")" == "$VERSION" ]]; then
    exit 0
fi
scratch="$(mktemp -d "$(dirname "$dir")/.azurite.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
npm install --prefix "$scratch" --no-audit --no-fund --loglevel=error "azurite@$VERSION" >&2
echo "$VERSION" > "$scratch/.complete"
rm -rf "$dir"
mv "$scratch" "$dir"
trap - EXIT

#!/usr/bin/env bash
# Screenshot of an HTML report in headless Chromium (no network, throw-away profile).
#
# Usage: tools/screenshot_report.sh REPORT.html OUT.png [WIDTH HEIGHT]
#   Installs Debian's `chromium` package with apt-get when it is missing (needs root).
#   The PNG shows the page as a browser renders it: broken <img> would show as icons.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 REPORT.html OUT.png [WIDTH HEIGHT]" >&2
    exit 64
fi
report=$(realpath "$1")
out=$(realpath -m "$2")
width=${3:-1400}
height=${4:-3000}
[[ -f "$report" ]] || { echo "error: no report at $report" >&2; exit 66; }
if ! command -v chromium >/dev/null 2>&1; then
    echo "chromium not found: installing Debian's chromium package" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >&2
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --hide-scrollbars \
    --user-data-dir="$profile" --screenshot="$out" --window-size="${width},${height}" \
    "file://$report" >/dev/null 2>&1
[[ -s "$out" ]] || { echo "error: chromium wrote no screenshot" >&2; exit 1; }
echo "$out"

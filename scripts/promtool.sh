#!/usr/bin/env bash
# promtool for the metrics tests, taken out of Debian's own `prometheus` package without
# installing it: installing would enable and start a Prometheus server on the test machine.
# Prints the path of the binary; cached in /var/cache/pruned-promtool.
set -euo pipefail
CACHE=/var/cache/pruned-promtool
if [[ ! -x $CACHE/usr/bin/promtool ]]; then
    tmp=$(mktemp -d)
    chmod 755 "$tmp"  # apt downloads as _apt
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download -q prometheus >/dev/null)
    mkdir -p "$CACHE"
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
    install -D -m 0755 "$tmp/x/usr/bin/promtool" "$CACHE/usr/bin/promtool"
fi
echo "$CACHE/usr/bin/promtool"

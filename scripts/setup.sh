#!/usr/bin/env bash
# Make a working checkout: the system packages pruned builds against (as root, only if missing),
# then .venv with pruned and its test tools. No Slurm cluster; see scripts/test.sh for that.
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-systemd is only for /usr/bin/python3; the venv builds systemd-python from source.
BASE_PKGS=(python3-venv python3-dev gcc pkg-config libsystemd-dev)

missing=()
for pkg in "${BASE_PKGS[@]}"; do
    dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null | grep -q '^ii' || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup.sh: missing packages ${missing[*]}; run as root (sudo bash scripts/setup.sh)" >&2
        exit 1
    fi
    bash tests/cluster/cluster.sh install --base
fi

# Test-only, from Debian: faketime (libfaketime) lets tests/real/test_clock_step.py step the
# daemon's wall clock without touching the machine's (its test skips without it).
TEST_PKGS=(faketime)
missing=()
for pkg in "${TEST_PKGS[@]}"; do
    dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null | grep -q '^ii' || missing+=("$pkg")
done
if ((${#missing[@]})) && [[ $(id -u) -eq 0 ]]; then
    { apt-get update -q >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } ||
        echo "setup.sh: could not install ${missing[*]}; the clock-step test will skip" >&2
fi

# Debian's python, not whatever python3 is first on PATH: systemd-python must build against it.
[[ -x .venv/bin/python ]] || /usr/bin/python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
echo "setup.sh: ready: .venv/bin/pruned" >&2

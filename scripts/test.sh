#!/usr/bin/env bash
# Everything CI runs, on a fresh Debian 12 machine, as root: packages, venv, ruff, then the whole
# test suite against a real single-node Slurm cluster (brought up and down by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "test.sh: the tests create users, cgroups and a Slurm cluster; run as root" \
         "(sudo bash scripts/test.sh)" >&2
    exit 1
fi

bash tests/cluster/cluster.sh install
bash scripts/setup.sh
.venv/bin/ruff check pruned tests bench

rc=0
.venv/bin/pytest -q -p no:cacheprovider tests || rc=$?
if ((rc == 5)); then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$rc"

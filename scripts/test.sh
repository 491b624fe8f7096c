#!/usr/bin/env bash
# Everything CI runs, on a fresh Debian 12 machine, as root: packages, venv, ruff, then every
# tier and lane, each run even when an earlier one failed so one run reports them all:
#   pytest tests        unit, fuzz, real, cluster (a real single-node Slurm the tests start)
#   tests/pkg/run.sh    the Debian package in a clean bookworm chroot (~1-2 min)
#   tests/vm/run.sh all three real nodes in qemu: bookworm, trixie, forky (~10-15 min fresh)
# `bash scripts/test.sh --host` runs only the first (what a quick local round needs).
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
PRUNED_PROMTOOL=$(bash scripts/promtool.sh)
export PRUNED_PROMTOOL

rc=0
.venv/bin/pytest -q -p no:cacheprovider tests || rc=$?
if ((rc == 5)); then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
if [[ "${1:-}" != "--host" ]]; then
    bash tests/pkg/run.sh || rc=1
    bash tests/vm/run.sh all || rc=1
fi
exit "$rc"

#!/bin/bash
# Runs inside the VM from pruned-vm-run.service once the node's daemons were started:
# records the node's versions, installs pruned the way a site admin does, runs the scenarios
# with this release's own pytest, and leaves everything in results/ on the payload disk.
# The unit powers the VM off when this exits, whatever the outcome.
set -uo pipefail

P=/run/pruned-vm
R=$P/results
mkdir -p "$R"
# ttyS1 is the host's live view (a plain file there); no newline translation.
stty -F /dev/ttyS1 raw -echo 2>/dev/null || true
exec > >(tee -a "$R/run.log" /dev/ttyS1) 2>&1

finish() {
    journalctl -b --no-pager -o short-monotonic >"$R/journal.txt" 2>&1 || true
    sync
}
trap finish EXIT

echo "run-scenarios: waiting for the boot to finish"
state=$(timeout 300 systemctl is-system-running --wait 2>&1) || true
echo "run-scenarios: system state: $state"
systemctl --no-pager --failed || true

# ---- the node's versions (README's "tested on" table) --------------------------------------
. /etc/os-release
cgmode=unknown
if [[ $(stat -fc %T /sys/fs/cgroup) == cgroup2fs ]]; then
    if grep -q ' - cgroup ' /proc/self/mountinfo; then cgmode=hybrid; else cgmode=v2; fi
elif grep -q ' - cgroup ' /proc/self/mountinfo; then
    cgmode=v1
fi
{
    echo "debian=$(cat /etc/debian_version)"
    echo "codename=${VERSION_CODENAME:-}"
    echo "systemd=$(systemctl --version | sed -n '1s/^systemd \([^ ]*\) (\(.*\))$/\1 (\2)/p')"
    echo "kernel=$(uname -r)"
    echo "slurm=$(sinfo -V | awk '{print $2}')"
    echo "openssh=$(dpkg-query -W -f='${Version}' openssh-server)"
    echo "python=$(python3 -c 'import platform; print(platform.python_version())')"
    echo "pytest=$(python3 -m pytest --version 2>&1 | awk '{print $2}')"
    echo "cgroup=$cgmode"
} >"$R/info.txt"
cat "$R/info.txt"

# ---- install pruned as a site admin would (README "Installing on a node") ------------------
# The package built from the checkout, with apt and no network: it goes in only if Debian
# packages already on the node (packages.txt) satisfy its Depends: the guest has no network
# device, so apt cannot fetch anything (and --no-download breaks installing a .deb by path:
# "Pathname to install is not absolute"). No pip, no compiler here.
# Each step's output is kept in results/install/ for scenarios/test_package.py.
I=$R/install
mkdir -p "$I"
step() {  # step NAME CMD...: run CMD, keep its output and exit status
    local name=$1; shift
    "$@" >"$I/$name.out" 2>&1
    local rc=$?
    echo "$rc" >"$I/$name.rc"
    echo "run-scenarios: install: $name: exit $rc"
    return "$rc"
}
install_pruned() {
    local deb
    deb=$(ls "$P"/deb/install/pruned_*_all.deb) || return 1
    step apt-install env DEBIAN_FRONTEND=noninteractive apt-get install -y \
        --no-install-recommends "$deb" || return 1
    step version pruned --version
    step man env MANPAGER=cat MANWIDTH=100 man pruned
    step man-policy env MANPAGER=cat MANWIDTH=100 man pruned-policy
    # The site's drop-in beside the shipped default (README: never edit the conffile).
    install -m 644 "$P/scenarios/policy-vm.yaml" /etc/pruned/policy.d/50-vm.yaml
    step check-config pruned check-config || return 1
    step enable-now systemctl enable --now pruned.service || return 1
    step dpkg-L dpkg -L pruned
}
if ! install_pruned; then
    echo "run-scenarios: installing pruned failed"
    tail -n 20 "$I"/*.out
    echo "could not install pruned" >"$R/summary.txt"
    echo 1 >"$R/rc"
    exit 1
fi
systemd-analyze security --no-pager pruned.service >"$R/security.txt" 2>&1 || true
echo "pruned_exposure=$(sed -n 's/.*Overall exposure level for pruned.service: \([0-9.]* [A-Z]*\).*/\1/p' \
    "$R/security.txt")" >>"$R/info.txt"
tail -n 1 "$R/info.txt"

# ---- the scenarios ---------------------------------------------------------------------------
cd "$P/scenarios" || exit 1
args=(.)  # the host's PRUNED_VM_PYTEST, word-split as a shell would: a subset to rerun
[[ -s $P/pytest-args ]] && read -r -a args <"$P/pytest-args"
python3 -m pytest -v -rfE -p no:cacheprovider --junitxml="$R/junit.xml" "${args[@]}" 2>&1 |
    tee "$R/pytest.txt"
rc=${PIPESTATUS[0]}
# pytest's last line, "==== 12 passed, 1 failed in 95.12s (0:01:35) ====", without the rules.
tail -n 1 "$R/pytest.txt" | sed -e 's/^=* *//' -e 's/ *=*$//' -e 's/ (\([0-9:]*\))$//' \
    >"$R/summary.txt"
echo "$rc" >"$R/rc"
echo "run-scenarios: pytest exit $rc"

# ---- opt-in benches (PRUNED_VM_BENCH=1 on the host: the checkout's bench/ and pruned/) -----
# After the scenarios, so they cannot disturb them; the scenarios' result stands either way.
if [[ -d $P/bench/bench ]]; then
    echo "run-scenarios: bench_kill"
    systemctl stop pruned.service  # the node's own pruned must not judge the bench's strays
    (cd "$P/bench" && timeout 600 python3 bench/bench_kill.py --repeat 5) \
        >"$R/bench_kill.txt" 2>&1
    echo "run-scenarios: bench_kill exit $? ($(tail -n 1 "$R/bench_kill.txt"))"
fi

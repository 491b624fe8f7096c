#!/usr/bin/env bash
# The VM lane (issue 10): for each Debian release, boot a real batch node under qemu -- systemd
# as PID 1, pure cgroup v2, munge + slurmctld + slurmd (cgroup/v2) + sshd with pam_slurm_adopt,
# all from their own units -- install pruned in it the way a site admin would (the Debian
# package scripts/build-deb.sh builds from this checkout, with apt, offline; then its upgrade
# and purge), and run tests/vm/scenarios/ inside it with that release's pytest.
#
# Usage: bash tests/vm/run.sh [bookworm|trixie|forky|all]...      (as root; default: all)
#
# Prints, per image, its Debian/systemd/kernel/Slurm/cgroup versions and ONE pytest summary
# line, then a final line; exits 1 if any image failed, did not boot or timed out.
#
# Settings (environment):
#   PRUNED_VM_CACHE    image cache (default /var/cache/pruned-vm): <release>-<key>/ per image,
#                      last-run/<release>/ with the logs of the last run of each image
#   PRUNED_VM_MIRROR   Debian mirror URL (default: the one this host's apt uses)
#   PRUNED_VM_TIMEOUT  seconds one VM may run before it is killed and fails (default 1500)
#   PRUNED_VM_REBUILD  1: rebuild the images even if cached
#   PRUNED_VM_VERBOSE  1: stream each guest's scenario output while it runs
#   PRUNED_VM_KEEP     1: keep the run's temp dir (overlays, payload) for debugging
#   PRUNED_VM_PYTEST   the scenarios' pytest arguments instead of all of them, e.g.
#                      "test_job_container.py" or "-k crashed" (a debugging aid: the
#                      lane's result then covers only those)
#   PRUNED_VM_BENCH    1: after the scenarios, run bench/bench_kill.py in each guest
#                      (results/bench_kill.txt)
#   PRUNED_VM_DEBUG    1: a root shell on the guest's ttyS2, a unix socket on the host
#                      (python3 tests/vm/shell.py SOCKET, or socat); implies PRUNED_VM_KEEP=1
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${PRUNED_VM_CACHE:-/var/cache/pruned-vm}
TIMEOUT=${PRUNED_VM_TIMEOUT:-1500}
ALL_RELEASES=(bookworm trixie forky)

# Host packages the lane needs, by the command that shows each is there.
declare -A HOST_PKGS=(
    [qemu-system-x86_64]=qemu-system-x86
    [qemu-img]=qemu-utils
    [mmdebstrap]=mmdebstrap
    [mkfs.ext4]=e2fsprogs
    [debugfs]=e2fsprogs
    [flock]=util-linux
    [findmnt]=util-linux
)

log() { printf 'vm: %s\n' "$*" >&2; }
die() { printf 'vm: error: %s\n' "$*" >&2; exit 1; }

# ---- cleanup: only what this run made ----------------------------------------------------

WORK=
QEMU_PID=
TAIL_PID=
cleanup() {
    local rc=$?
    # Our own qemu and tail only, by the PIDs we recorded when we started them.
    [[ -n $QEMU_PID ]] && kill -KILL "$QEMU_PID" 2>/dev/null
    [[ -n $TAIL_PID ]] && kill -TERM "$TAIL_PID" 2>/dev/null
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ ${PRUNED_VM_KEEP:-} == 1 || ${PRUNED_VM_DEBUG:-} == 1 ]]; then
            log "kept $WORK"
        else
            rm -rf --one-file-system "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- host -----------------------------------------------------------------------------------

ensure_host_tools() {
    local missing=() cmd pkg
    for cmd in "${!HOST_PKGS[@]}"; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("${HOST_PKGS[$cmd]}")
    done
    ((${#missing[@]})) || return 0
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    # Refresh the package lists once, and only when apt does not know a package yet.
    for pkg in "${missing[@]}"; do
        if [[ $(apt-cache policy "$pkg" 2>/dev/null) != *"Candidate: "[!\(]* ]]; then
            log "apt-get update (apt does not know $pkg yet)"
            apt-get update -qq
            break
        fi
    done
    log "installing on the host: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

# The Debian mirror this host's apt uses for its own release (not -security, which mirrors do
# not carry): the image is built from where the host already gets its packages.
host_mirror() {
    if [[ -n ${PRUNED_VM_MIRROR:-} ]]; then
        echo "$PRUNED_VM_MIRROR"
        return
    fi
    local codename f uri=
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    [[ -n $codename ]] || die "no VERSION_CODENAME in /etc/os-release; set PRUNED_VM_MIRROR"
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        # deb822: one stanza per paragraph; take the first "deb" stanza serving $codename.
        uri=$(awk -v cn="$codename" 'BEGIN { RS = ""; FS = "\n" }
            {
                types = uris = suites = ""; enabled = "yes"
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^[ \t]*#/) continue
                    split($i, kv, /:[ \t]*/)
                    key = tolower(kv[1]); val = substr($i, index($i, ":") + 1)
                    gsub(/^[ \t]+|[ \t]+$/, "", val)
                    if (key == "types") types = val
                    else if (key == "uris") uris = val
                    else if (key == "suites") suites = val
                    else if (key == "enabled") enabled = tolower(val)
                }
                if (enabled != "no" && (" " types " ") ~ / deb / && (" " suites " ") ~ (" " cn " ")) {
                    split(uris, u, /[ \t]+/); print u[1]; exit
                }
            }' "$f")
        [[ -n $uri ]] && break
    done
    if [[ -z $uri ]]; then
        # One-line format: deb [options] URI SUITE COMPONENT...
        uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            sed -e 's/#.*//' -e 's/\[[^]]*\]//' |
            awk -v cn="$codename" '$1 == "deb" && $3 == cn { print $2; exit }')
    fi
    [[ -n $uri ]] || die "no Debian mirror for '$codename' in /etc/apt; set PRUNED_VM_MIRROR"
    echo "${uri%/}"
}

# The Debian package of the checkout as it is now (scripts/build-deb.sh copies the tree, so
# the checkout stays clean; as root it installs missing build dependencies with apt), and the
# same tree rebuilt as a higher version: the guest upgrades to it last. One package for every
# release: Architecture: all, Python code in /usr/lib/python3/dist-packages (no python3.X
# paths), Depends: python3 (>= 3.11) and Debian's python3-* modules.
UPGRADE_SUFFIX=+vm1
build_debs() {
    local out=$1 upstream
    mkdir -p "$out/install" "$out/upgrade"
    upstream=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$REPO/pruned/__init__.py")
    [[ -n $upstream ]] || die "no __version__ in $REPO/pruned/__init__.py"
    bash "$REPO/scripts/build-deb.sh" --no-lintian --out "$out/install" >"$WORK/deb.log" 2>&1 &&
        bash "$REPO/scripts/build-deb.sh" --no-lintian --version "$upstream$UPGRADE_SUFFIX" \
            --out "$out/upgrade" >>"$WORK/deb.log" 2>&1 ||
        { tail -n 30 "$WORK/deb.log" >&2; die "building the pruned package failed"; }
    rm -f "$out"/*/*.buildinfo "$out"/*/*.changes "$out"/*/build.log
}

# ---- images ---------------------------------------------------------------------------------

# The cache key: what the image is made of (the package list and the recipe), per release.
image_key() {
    { echo "$1"; cat "$HERE/packages.txt" "$HERE/image.sh" "$HERE"/image/*; } |
        sha256sum | cut -c1-12
}

# Print the directory of RELEASE's image, building it first when it is not cached.
ensure_image() {
    local release=$1 mirror=$2 key dir tmp t0
    key=$(image_key "$release")
    dir=$CACHE/$release-$key
    mkdir -p "$CACHE"
    # One builder per release at a time (two CI jobs on one machine share the cache).
    exec {lock}>"$CACHE/.lock-$release"
    flock "$lock"
    if [[ ${PRUNED_VM_REBUILD:-} == 1 && -d $dir && ! -e $dir/.rebuilt-$$ ]]; then
        rm -rf --one-file-system "$dir"
    fi
    if [[ ! -f $dir/root.img ]]; then
        # Under the lock, any other build dir of this release is from a builder that died
        # (--one-file-system: a mount mmdebstrap left behind is skipped, never entered).
        find "$CACHE" -maxdepth 1 -name ".build-$release-*" -type d \
            -exec rm -rf --one-file-system {} + 2>/dev/null || true
        tmp=$CACHE/.build-$release-$key.$$
        log "$release: building image $dir from $mirror (log: $tmp/build.log)"
        t0=$SECONDS
        mkdir -p "$tmp"
        if ! bash "$HERE/image.sh" build "$release" "$mirror" "$tmp" >"$tmp/build.log" 2>&1; then
            tail -n 30 "$tmp/build.log" >&2
            mkdir -p "$CACHE/last-run"
            cp "$tmp/build.log" "$CACHE/last-run/$release-build.log" 2>/dev/null || true
            rm -rf --one-file-system "$tmp"
            flock -u "$lock"
            return 1
        fi
        echo $((SECONDS - t0)) >"$tmp/build-seconds"
        mv "$tmp" "$dir"
        touch "$dir/.rebuilt-$$"
        # Older images of this release (other keys) are dead weight now.
        find "$CACHE" -maxdepth 1 -name "$release-*" ! -name "$release-$key" -type d \
            -exec rm -rf --one-file-system {} +
        log "$release: image built in $(cat "$dir/build-seconds")s"
    fi
    flock -u "$lock"
    echo "$dir"
}

# ---- one VM ---------------------------------------------------------------------------------

alive() { [[ -n $1 ]] && kill -0 "$1" 2>/dev/null; }

# The per-run payload: a small ext4 disk with the packages, the scenarios and the guest
# scripts, and an empty results/ the guest writes into.
make_payload() {
    local release=$1 run=$2 p=$2/payload
    mkdir -p "$p/results"
    cp -r "$WORK/deb" "$HERE/guest" "$HERE/scenarios" "$p/"
    find "$p" -name __pycache__ -prune -exec rm -rf {} +
    echo "$release" >"$p/release"
    [[ ${PRUNED_VM_DEBUG:-} == 1 ]] && touch "$p/debug"
    [[ -n ${PRUNED_VM_PYTEST:-} ]] && printf '%s\n' "$PRUNED_VM_PYTEST" >"$p/pytest-args"
    if [[ ${PRUNED_VM_BENCH:-} == 1 ]]; then  # the checkout's benches, run after the scenarios
        mkdir -p "$p/bench/tests"
        cp -r "$REPO/pruned" "$REPO/bench" "$p/bench/"
        cp -r "$REPO/tests/__init__.py" "$REPO/tests/fixtures" "$p/bench/tests/"
        find "$p/bench" -name __pycache__ -prune -exec rm -rf {} +
    fi
    truncate -s 256M "$run/payload.img"
    mkfs.ext4 -q -F -L payload -d "$p" "$run/payload.img"
}

# Boot RELEASE's image once; results land in $run/results. Returns 0 if the VM powered off
# by itself, 1 if the watchdog had to kill it.
boot_vm() {
    local release=$1 img=$2 run=$3 deadline
    qemu-img create -q -f qcow2 -F raw -b "$img/root.img" "$run/overlay.qcow2"
    : >"$run/results.log"
    local debug=()
    if [[ ${PRUNED_VM_DEBUG:-} == 1 ]]; then
        debug=(-serial "unix:$run/shell.sock,server=on,wait=off")
        log "$release: root shell on the guest's ttyS2: python3 $HERE/shell.py $run/shell.sock"
    fi
    # TCG: KVM does not work on this machine (harness.md section 6). -nic none and -nodefaults:
    # no network device at all; the guest has loopback and a dummy interface only.
    # ttyS0 = console (kernel, systemd); ttyS1 = the scenario runner's live output. The payload
    # disk's serial makes it /dev/disk/by-id/virtio-payload in the guest, and the root is found
    # by its label: the kernel's vda/vdb order need not follow the command line.
    qemu-system-x86_64 -nodefaults -accel tcg -cpu max -smp 2 -m 2048 \
        -nic none -display none -monitor none -no-reboot \
        -kernel "$img/vmlinuz" -initrd "$img/initrd.img" \
        -append "root=LABEL=vmroot rw console=ttyS0 panic=-1" \
        -drive "file=$run/overlay.qcow2,if=none,id=root,format=qcow2" \
        -device virtio-blk-pci,drive=root,serial=root \
        -drive "file=$run/payload.img,if=none,id=payload,format=raw" \
        -device virtio-blk-pci,drive=payload,serial=payload \
        -serial "file:$run/console.log" -serial "file:$run/results.log" "${debug[@]}" \
        </dev/null >"$run/qemu.log" 2>&1 &
    QEMU_PID=$!
    if [[ ${PRUNED_VM_VERBOSE:-} == 1 ]]; then
        tail -n +1 -F --pid="$QEMU_PID" "$run/results.log" 2>/dev/null |
            sed -u "s/\r$//; s/^/$release| /" >&2 &
        TAIL_PID=$!
    fi
    deadline=$((SECONDS + TIMEOUT))
    while alive "$QEMU_PID" && ((SECONDS < deadline)); do
        sleep 2
    done
    local rc=0
    if alive "$QEMU_PID"; then
        log "$release: VM still running after ${TIMEOUT}s; killing qemu (pid $QEMU_PID)"
        kill -TERM "$QEMU_PID" 2>/dev/null || true
        sleep 3
        kill -KILL "$QEMU_PID" 2>/dev/null || true
        rc=1
    fi
    wait "$QEMU_PID" 2>/dev/null || true
    QEMU_PID=
    if [[ -n $TAIL_PID ]]; then
        wait "$TAIL_PID" 2>/dev/null || true
        TAIL_PID=
    fi
    # Read the results straight out of the ext4 image: no loop device, no mount.
    debugfs -R "rdump /results $run" "$run/payload.img" >/dev/null 2>&1 || true
    return "$rc"
}

info_field() { sed -n "s/^$1=//p" "$2" 2>/dev/null | head -n1; }

# Run RELEASE end to end; print its info and summary lines; return non-zero on any failure.
run_release() {
    local release=$1 mirror=$2 img run t0 built=cached rc=0 summary info last
    t0=$SECONDS
    run=$WORK/$release
    mkdir -p "$run"
    img=$(ensure_image "$release" "$mirror") || {
        echo "$release: FAILED: image build failed (log: $CACHE/last-run/$release-build.log)"
        return 1
    }
    [[ -e $img/.rebuilt-$$ ]] && built="built in $(cat "$img/build-seconds")s"
    make_payload "$release" "$run"
    local tboot=$SECONDS retried=
    boot_vm "$release" "$img" "$run" || rc=$?
    # A guest that died before its runner started (no info.txt) and was not hung: under TCG
    # the kernel very rarely oopses while it patches its own code at boot (seen once in ~20
    # boots: "Oops: int3" in sched_clock_cpu). Boot once more from a fresh overlay and
    # payload; the final line says so. A hang or a failing scenario is never retried.
    if ((rc == 0)) && [[ ! -f $run/results/info.txt ]]; then
        local why
        why=$(grep -m1 -E 'Kernel panic|Oops|No init found' "$run/console.log" | cut -c1-120)
        log "$release: the guest died while booting (${why:-no kernel message}); retrying once"
        mkdir -p "$run/attempt1"
        mv "$run"/{console.log,results.log,qemu.log,overlay.qcow2,payload.img} "$run/attempt1/" \
            2>/dev/null || true
        rm -rf "$run/results" "$run/payload"
        make_payload "$release" "$run"
        retried=" after a boot retry"
        boot_vm "$release" "$img" "$run" || rc=$?
    fi
    local vm_secs=$((SECONDS - tboot))

    # Keep this run's logs where a human can find them, outside the repo.
    last=$CACHE/last-run/$release
    rm -rf "$last"
    mkdir -p "$last"
    cp "$run"/{console.log,results.log,qemu.log} "$last/" 2>/dev/null || true
    [[ -d $run/attempt1 ]] && cp "$run/attempt1/console.log" "$last/console-attempt1.log"
    [[ -d $run/results ]] && cp -r "$run/results/." "$last/"

    info=$run/results/info.txt
    if [[ -f $info ]]; then
        printf '%s: Debian %s (%s), systemd %s, kernel %s, Slurm %s, cgroup %s;' "$release" \
            "$(info_field debian "$info")" "$(info_field codename "$info")" \
            "$(info_field systemd "$info")" "$(info_field kernel "$info")" \
            "$(info_field slurm "$info")" "$(info_field cgroup "$info")"
        printf ' Python %s, OpenSSH %s; systemd-analyze security pruned.service: %s\n' \
            "$(info_field python "$info")" "$(info_field openssh "$info")" \
            "$(info_field pruned_exposure "$info")"
    fi
    if [[ -f $run/results/cgroup_paths.txt ]]; then
        mkdir -p "$REPO/tests/fixtures/cgroup_paths"
        cp "$run/results/cgroup_paths.txt" "$REPO/tests/fixtures/cgroup_paths/$release.txt"
    fi

    local timing="VM ${vm_secs}s$retried, total $((SECONDS - t0))s, image $built"
    summary=$(cat "$run/results/summary.txt" 2>/dev/null || true)
    local prc
    prc=$(cat "$run/results/rc" 2>/dev/null || echo none)
    if ((rc != 0)); then
        echo "$release: FAILED: timed out after ${TIMEOUT}s${summary:+ ($summary)} [$timing; logs: $last]"
        return 1
    fi
    if [[ -z $summary || $prc == none ]]; then
        echo "$release: FAILED: the scenarios did not run (see $last/console.log, $last/results.log) [$timing]"
        return 1
    fi
    echo "$release: $summary [$timing]"
    if [[ $prc != 0 ]]; then
        # The failing tests' one-line reasons, so CI logs say what broke without digging.
        grep -E '^(FAILED|ERROR) ' "$run/results/pytest.txt" 2>/dev/null | sed "s/^/  /" || true
        echo "  (full output: $last/pytest.txt)"
        return 1
    fi
}

main() {
    [[ $(id -u) -eq 0 ]] || die "run as root: it builds root file systems and boots VMs"
    local releases=() r
    (($#)) || set -- all
    for r in "$@"; do
        case $r in
            all) releases+=("${ALL_RELEASES[@]}") ;;
            bookworm | trixie | forky) releases+=("$r") ;;
            *) die "unknown release '$r' (want: ${ALL_RELEASES[*]} or all)" ;;
        esac
    done
    local t0=$SECONDS mirror failed=()
    ensure_host_tools
    mirror=$(host_mirror)
    WORK=$(mktemp -d /var/tmp/pruned-vm.XXXXXX)
    build_debs "$WORK/deb"
    for r in "${releases[@]}"; do
        run_release "$r" "$mirror" || failed+=("$r")
    done
    local secs=$((SECONDS - t0))
    if ((${#failed[@]})); then
        echo "vm: FAILED on ${failed[*]} (${#releases[@]} images, $((secs / 60))m$((secs % 60))s)"
        return 1
    fi
    echo "vm: all ${#releases[@]} images passed ($((secs / 60))m$((secs % 60))s)"
}

# On one line: bash reads a script as it runs it, so an edit of this file while it runs must
# not make it execute what now lies past the old end.
main "$@"; exit

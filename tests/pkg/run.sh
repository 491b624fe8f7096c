#!/usr/bin/env bash
# The Debian package, proven on a clean Debian: build the .deb from this checkout (and an
# upgrade of it), lintian it, then in a fresh bookworm chroot (mmdebstrap --variant=apt, no
# python3-pip, no gcc) install it with apt resolving its dependencies from Debian, run
# `pruned --version`, `man pruned`, `man pruned-policy`, `pruned check-config`, `pruned scan`,
# upgrade to the rebuilt higher version keeping a locally modified conffile, and purge it,
# leaving nothing behind. Prints "N passed, M failed"; exits 1 on any failure.
#
#   bash tests/pkg/run.sh [--keep] [--fresh] [--src DIR]
#     --keep    leave the chroot in /var/tmp (its path is printed) instead of removing it
#     --fresh   rebuild the chroot tarball even if a cached one matches
#     --src DIR build from DIR (a copy of a checkout) instead of this checkout
#
# Root only. The chroot tarball is cached in /var/cache/pruned-pkg/, keyed by the release,
# the host's Debian sources, the package list below and this recipe. Everything the chroot
# mounts (proc) lives in a private mount namespace and is unmounted on exit; nothing here
# touches the host's /etc/pruned or systemd. Network: only the Debian mirror, through apt.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
RELEASE=bookworm
CACHE=/var/cache/pruned-pkg
# What the chroot has beyond --variant=apt: man-db for `man`, bash-completion and logrotate
# to check the files pruned ships for them. Never python3-pip, never a compiler.
CHROOT_PKGS=(man-db bash-completion logrotate)
RECIPE=3   # bump when the way the tarball is made changes
KEEP=0
FRESH=0
SRC=$REPO

log() { echo "pkg: $*" >&2; }
die() { echo "pkg: $*" >&2; exit 1; }

ARGS=("$@")
while (($#)); do
    case $1 in
        --keep) KEEP=1; shift ;;
        --fresh) FRESH=1; shift ;;
        --src) SRC=$(cd "$2" && pwd); shift 2 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done
[[ $(id -u) -eq 0 ]] || die "needs root (mmdebstrap, chroot, mount)"

# The whole run in a private mount namespace: a mount made here can never outlive the run or
# show up on the host, even if this script is killed.
if [[ -z ${PRUNED_PKG_NS:-} ]]; then
    exec env PRUNED_PKG_NS=1 unshare --mount --propagation private -- bash "$0" "${ARGS[@]}"
fi

T0=$SECONDS
WORK=$(mktemp -d /var/tmp/pruned-pkg.XXXXXX)
ROOT=$WORK/root
cleanup() {
    local rc=$?
    # Unmount whatever is mounted below the chroot, deepest first, before removing anything.
    local m
    while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done < <(findmnt -rn -o TARGET | awk -v r="$ROOT" 'index($0, r) == 1' | sort -r)
    if findmnt -rn -o TARGET | awk -v r="$ROOT" 'index($0, r) == 1 { f = 1 } END { exit !f }'; then
        echo "pkg: mounts left under $ROOT; not removing $WORK" >&2
    elif ((KEEP)); then
        echo "pkg: kept $WORK" >&2
    else
        rm -rf --one-file-system "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- checks ----------------------------------------------------------------------------
PASSED=0
FAILED=0
FAILURES=()
# check NAME CMD...: run CMD, count it, show its output when it fails.
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then
        PASSED=$((PASSED + 1))
        echo "ok    $name"
    else
        FAILED=$((FAILED + 1))
        FAILURES+=("$name")
        echo "FAIL  $name"
        [[ -n $out ]] && printf '%s\n' "$out" | tail -n 20 | sed 's/^/      /'
    fi
    return 0
}
inroot() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LC_ALL=C.UTF-8 TERM=dumb DEBIAN_FRONTEND=noninteractive "$@"; }
# inroot_grep PATTERN CMD...: CMD succeeds and its output matches PATTERN (grep -E).
inroot_grep() {
    local pat=$1 out
    shift
    out=$(inroot "$@" 2>&1) || { printf '%s\n' "$out"; return 1; }
    grep -Eq -- "$pat" <<<"$out" || { printf 'no match for %s in:\n%s\n' "$pat" "$out"; return 1; }
}
absent() { [[ ! -e $ROOT$1 && ! -L $ROOT$1 ]] || { ls -la "$ROOT$1"; return 1; }; }
not_installed() { ! inroot dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | grep -q '^ii'; }

# ---- host tools ------------------------------------------------------------------------
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v lintian >/dev/null || need+=(lintian)
command -v dpkg-deb >/dev/null || need+=(dpkg)
if ((${#need[@]})); then
    log "installing on the host: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
fi

# The host's Debian sources (deb822 files naming a Debian archive): what the chroot uses.
SOURCES=()
for f in /etc/apt/sources.list.d/*.sources; do
    [[ -r $f ]] && grep -Eq '^URIs:.*/debian(-security)?/?( |$)' "$f" && SOURCES+=("$f")
done
((${#SOURCES[@]})) || die "no Debian deb822 sources in /etc/apt/sources.list.d"

# ---- build -----------------------------------------------------------------------------
t=$SECONDS
DEB1=$(bash "$REPO/scripts/build-deb.sh" --no-lintian --src "$SRC" --out "$WORK/deb1") ||
    die "building the package failed"
V1=$(dpkg-deb -f "$DEB1" Version)
# The upgrade: the same tree, a higher version, and a changed default policy, so that dpkg
# has to decide between the site's edit of the conffile and the package's new one.
SRC2=$WORK/src2
mkdir -p "$SRC2"
if git -C "$SRC" rev-parse --show-toplevel >/dev/null 2>&1; then
    (cd "$SRC" && git ls-files -z -co --exclude-standard) |
        (cd "$SRC" && xargs -0 -r cp -a --parents -t "$SRC2")
else
    cp -a "$SRC/." "$SRC2/"
fi
printf '\n# Changed by the upgrade that tests/pkg/run.sh builds.\n' >>"$SRC2/policies/default.yaml"
V2="$V1+pkgtest1"
DEB2=$(bash "$REPO/scripts/build-deb.sh" --no-lintian --src "$SRC2" --out "$WORK/deb2" \
    --version "$V2") || die "building the upgrade package failed"
BUILD_S=$((SECONDS - t))
log "built $(basename "$DEB1") and $(basename "$DEB2") in ${BUILD_S}s"

check "lintian: no errors in $(basename "$DEB1")" \
    lintian --fail-on error "$DEB1"
check "Depends are Debian packages only (no psutil, no PyPI names)" bash -c '
    d=$(dpkg-deb -f "$1" Depends); echo "Depends: $d"
    for p in python3-yaml python3-systemd "python3 (>= 3.11)"; do
        [[ $d == *"$p"* ]] || { echo "missing $p"; exit 1; }; done
    [[ $d != *psutil* && $d != *systemd-python* && $d != *pip* ]]' _ "$DEB1"

# ---- the chroot --------------------------------------------------------------------------
key=$({ echo "$RELEASE $RECIPE ${CHROOT_PKGS[*]}"; cat "${SOURCES[@]}"; } | sha256sum | cut -c1-16)
TARBALL=$CACHE/$RELEASE-$key.tar
t=$SECONDS
if ((FRESH)) || [[ ! -s $TARBALL ]]; then
    CHROOT_FROM=fresh
    log "making $TARBALL (mmdebstrap --variant=apt ${CHROOT_PKGS[*]})"
    mkdir -p "$CACHE"
    # -o: apt and dpkg in the chroot are told nothing about Recommends (a node might not
    # install them either); the tarball is written under a temporary name, then moved.
    mmdebstrap --mode=root --variant=apt --format=tar \
        --aptopt='APT::Install-Recommends "false"' \
        --include="$(IFS=,; echo "${CHROOT_PKGS[*]}")" \
        "$RELEASE" "$TARBALL.tmp" "${SOURCES[@]}" >"$WORK/mmdebstrap.log" 2>&1 ||
        { tail -n 30 "$WORK/mmdebstrap.log" >&2; rm -f "$TARBALL.tmp"; die "mmdebstrap failed"; }
    mv "$TARBALL.tmp" "$TARBALL"
    # Older tarballs of other keys are of no further use.
    find "$CACHE" -maxdepth 1 -name "$RELEASE-*.tar" ! -name "$(basename "$TARBALL")" -delete
else
    CHROOT_FROM=cached
fi
mkdir -p "$ROOT"
tar -xpf "$TARBALL" -C "$ROOT" --numeric-owner
CHROOT_S=$((SECONDS - t))
log "chroot ($CHROOT_FROM tarball) ready in ${CHROOT_S}s: $ROOT"

# proc of the host's pid namespace: `pruned scan` reads the real process table (read-only).
mount -t proc -o nosuid,nodev,noexec proc "$ROOT/proc"
# No service may start from a maintainer script in here, whatever the package says.
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
[[ -c $ROOT/dev/null ]] || die "the chroot has no /dev/null"

check "chroot: no python3-pip, no gcc, no python3-psutil before the install" bash -c '
    for p in python3-pip gcc cc python3-psutil; do
        chroot "$1" dpkg-query -W -f="\${db:Status-Abbrev}" "$p" 2>/dev/null | grep -q "^ii" &&
            { echo "$p is installed"; exit 1; }; done; exit 0' _ "$ROOT"
check "apt-get update in the chroot (Debian mirror)" inroot apt-get update -qq

# ---- install -----------------------------------------------------------------------------
cp "$DEB1" "$DEB2" "$ROOT/tmp/"
D1=/tmp/$(basename "$DEB1")
D2=/tmp/$(basename "$DEB2")
check "apt-get install ./$(basename "$DEB1") (dependencies from Debian)" \
    inroot apt-get install -y -q --no-install-recommends "$D1"
check "installed: python3-yaml python3-systemd from Debian" bash -c '
    for p in python3-yaml python3-systemd; do
        chroot "$1" dpkg-query -W -f="\${Package} \${Version} \${db:Status-Abbrev}\n" "$p" |
            grep -q " ii" || exit 1; done' _ "$ROOT"
check "still no python3-pip, gcc or psutil after the install" bash -c '
    for p in python3-pip gcc python3-psutil; do
        chroot "$1" dpkg-query -W -f="\${db:Status-Abbrev}" "$p" 2>/dev/null | grep -q "^ii" &&
            { echo "$p was pulled in"; exit 1; }; done
    ! chroot "$1" sh -c "command -v gcc cc pip pip3"' _ "$ROOT"
check "/usr/sbin/pruned, pruned-epilog, pruned-prolog; nothing in /usr/bin" bash -c '
    for b in pruned pruned-epilog pruned-prolog; do
        [[ -x $1/usr/sbin/$b && ! -e $1/usr/bin/$b ]] || { echo "$b"; exit 1; }; done' _ "$ROOT"
check "pruned --version" inroot_grep "^pruned ${V1%%[+~-]*}\$" pruned --version
check "pruned-epilog and pruned-prolog run (--help)" bash -c '
    chroot "$1" pruned-epilog --help | grep -q "pruned epilog" &&
    chroot "$1" pruned-prolog --help | grep -q "pruned prolog"' _ "$ROOT"
check "the unit is installed, ExecStart=/usr/sbin/pruned, not enabled" bash -c '
    u=$1/lib/systemd/system/pruned.service
    grep -qx "ExecStart=/usr/sbin/pruned run --policy /etc/pruned/policy.d" "$u" || exit 1
    ! ls "$1"/etc/systemd/system/*.wants/pruned.service 2>/dev/null' _ "$ROOT"
check "conffiles: /etc/pruned/policy.d/00-default.yaml, /etc/logrotate.d/pruned" bash -c '
    c=$(chroot "$1" dpkg-query -W -f="\${Conffiles}" pruned); echo "$c"
    grep -q "/etc/pruned/policy.d/00-default.yaml " <<<"$c" &&
    grep -q "/etc/logrotate.d/pruned " <<<"$c"' _ "$ROOT"
check "/var/lib/pruned and /var/log/pruned: root, 0700" bash -c '
    [[ $(stat -c "%U %a" "$1/var/lib/pruned") == "root 700" ]] &&
    [[ $(stat -c "%U %a" "$1/var/log/pruned") == "root 700" ]]' _ "$ROOT"
check "man pruned" inroot_grep "^COMMANDS" \
    env MANWIDTH=100 man -P cat pruned
check "man pruned-policy lists every schema key" bash -c '
    page=$(chroot "$1" env MANWIDTH=200 man -P cat pruned-policy) || exit 1
    keys=$(cd "$2" && /usr/bin/python3 -c "
import sys; sys.path.insert(0, \".\")
sys.path.insert(0, \"scripts\")
from gen_manpages import leaves
from pruned.policy.schema import SCHEMA
print(\"\n\".join(k for k, _ in leaves(SCHEMA)))") || exit 1
    for k in $keys; do grep -qF -- "$k" <<<"$page" || { echo "missing $k"; exit 1; }; done
    echo "$(wc -w <<<"$keys") keys"' _ "$ROOT" "$SRC2"
check "man 8 pruned-epilog (the same page)" inroot_grep "pruned-prolog" \
    env MANWIDTH=100 man -P cat 8 pruned-epilog
check "bash completion: pruned s<TAB> -> scan sweep" inroot_grep "^scan sweep$" bash -c '
    source /usr/share/bash-completion/bash_completion
    _completion_loader pruned
    COMP_WORDS=(pruned s); COMP_CWORD=1; COMP_LINE="pruned s"; COMP_POINT=8
    _pruned pruned s pruned; echo "${COMPREPLY[*]}"'
check "logrotate accepts /etc/logrotate.d/pruned" inroot logrotate -d /etc/logrotate.d/pruned
check "pruned check-config (no argument: /etc/pruned/policy.d)" \
    inroot_grep "^/etc/pruned/policy.d: ok" pruned check-config
check "pruned scan (read-only)" inroot_grep "^# [0-9]+ processes: .*policy mode report" \
    pruned scan
check "pruned scan --json" inroot_grep '^\{"action"' pruned scan --json
check "pruned scan --class stray (README)" inroot_grep "^# [0-9]+ processes" pruned scan --class stray

# ---- upgrade, keeping the site's edit of the conffile -------------------------------------
CONF=/etc/pruned/policy.d/00-default.yaml
sed -i 's/^min_age: 10s$/min_age: 20s  # site edit (tests\/pkg)/' "$ROOT$CONF"
check "the site's edit is in place and valid" bash -c '
    grep -q "site edit (tests/pkg)" "$1'"$CONF"'" && chroot "$1" pruned check-config >/dev/null' \
    _ "$ROOT"
# What pruned itself writes, so that purge has something of its own to remove.
echo '{"version": 1, "jobs": {}}' >"$ROOT/var/lib/pruned/history.json"
echo '{"PRUNED_EVENT": "pkgtest"}' >"$ROOT/var/log/pruned/audit.jsonl"
check "dpkg -i --force-confold $(basename "$DEB2") (upgrade)" \
    inroot dpkg -i --force-confold "$D2"
check "upgraded to $V2" bash -c \
    '[[ $(chroot "$1" dpkg-query -W -f="\${Version} \${db:Status-Abbrev}" pruned) == "$2 ii " ]]' \
    _ "$ROOT" "$V2"
check "the modified conffile was kept, the new one is .dpkg-dist" bash -c '
    grep -q "site edit (tests/pkg)" "$1'"$CONF"'" &&
    grep -q "Changed by the upgrade" "$1'"$CONF"'.dpkg-dist"' _ "$ROOT"
check "check-config after the upgrade ignores the .dpkg-dist file" \
    inroot_grep "files: /etc/pruned/policy.d/00-default.yaml\)$" pruned check-config
check "pruned scan after the upgrade" inroot_grep "^# [0-9]+ processes" pruned scan
check "state survived the upgrade" test -s "$ROOT/var/lib/pruned/history.json"

# ---- purge ---------------------------------------------------------------------------------
check "apt-get purge pruned" inroot apt-get purge -y -q pruned
check "purged: nothing under /etc/pruned, /var/lib/pruned, /var/log/pruned" bash -c '
    for d in /etc/pruned /var/lib/pruned /var/log/pruned; do
        [[ ! -e $1$d ]] || { find "$1$d"; exit 1; }; done' _ "$ROOT"
check "purged: no pruned* in /usr/sbin, no unit, no python package, no logrotate file" bash -c '
    ls "$1"/usr/sbin | grep pruned && exit 1
    for p in /lib/systemd/system/pruned.service /etc/logrotate.d/pruned \
             /usr/lib/python3/dist-packages/pruned /usr/share/man/man8/pruned.8.gz \
             /usr/share/bash-completion/completions/pruned /usr/share/doc/pruned; do
        [[ ! -e $1$p ]] || { echo "left: $p"; exit 1; }; done' _ "$ROOT"
check "purged: no file named *pruned* left anywhere (but the .debs in /tmp)" bash -c '
    left=$(cd "$1" && find . -xdev -path ./proc -prune -o -path ./tmp -prune -o \
        -name "*pruned*" -print)
    [[ -z $left ]] || { echo "$left"; exit 1; }' _ "$ROOT"
check "dpkg knows pruned no more" bash -c \
    '! chroot "$1" dpkg-query -W -f="\${db:Status-Abbrev}" pruned 2>/dev/null | grep -q "^[ir]"' \
    _ "$ROOT"

umount "$ROOT/proc"
TOTAL_S=$((SECONDS - T0))
log "timings: build ${BUILD_S}s, chroot ${CHROOT_S}s ($CHROOT_FROM), total ${TOTAL_S}s"
((FAILED == 0)) || log "failed: ${FAILURES[*]}"
echo "$PASSED passed, $FAILED failed"
((FAILED == 0))

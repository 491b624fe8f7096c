#!/usr/bin/env bash
# Build the pruned Debian package from this checkout: build/deb/pruned_<version>_all.deb.
#
#   bash scripts/build-deb.sh [--out DIR] [--version V] [--src DIR] [--no-lintian]
#
# The checkout as it is now (tracked and new files, not ignored ones) is copied to a
# scratch directory and built there with `dpkg-buildpackage -us -uc -b`, so the build leaves
# no .pybuild/, debian/pruned/ or *.egg-info in the checkout. Missing build dependencies are
# installed with apt when run as root (`apt-get build-dep` of debian/control); otherwise the
# script names them and stops. lintian runs on the result when it is installed.
#   --version V   build as Debian version V (a changelog entry is added in the copy; the
#                 upstream part before a +, ~ or - must stay pruned.__version__). tests/pkg
#                 uses it to build an upgrade.
#   --src DIR     build from DIR instead of this checkout (a tree with debian/ in it).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SRC=$REPO
OUT=$REPO/build/deb
VERSION=
LINTIAN=1

die() { echo "build-deb.sh: $*" >&2; exit 1; }
log() { echo "build-deb.sh: $*" >&2; }

while (($#)); do
    case $1 in
        --out) OUT=$2; shift 2 ;;
        --version) VERSION=$2; shift 2 ;;
        --src) SRC=$(cd "$2" && pwd); shift 2 ;;
        --no-lintian) LINTIAN=0; shift ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[[ -f $SRC/debian/control && -f $SRC/pyproject.toml ]] || die "$SRC has no debian/control"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

WORK=$(mktemp -d /var/tmp/pruned-deb.XXXXXX)
trap 'rm -rf --one-file-system "$WORK"' EXIT

# Build dependencies: dpkg-checkbuilddeps (dpkg-dev) knows them; apt installs what is missing.
deps_ok() { command -v dpkg-checkbuilddeps >/dev/null && dpkg-checkbuilddeps "$SRC/debian/control" 2>/dev/null; }
if ! deps_ok; then
    if [[ $(id -u) -ne 0 ]]; then
        command -v dpkg-checkbuilddeps >/dev/null || die "dpkg-dev is not installed; run as root or: apt-get install dpkg-dev"
        dpkg-checkbuilddeps "$SRC/debian/control" || true
        die "missing build dependencies (above); run as root to install them with apt"
    fi
    log "installing build dependencies with apt"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends dpkg-dev >/dev/null 2>&1; then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends dpkg-dev >/dev/null
    fi
    # build-dep of a directory reads its debian/control (needs apt's lists; update once if
    # apt does not know a package yet).
    apt-get build-dep -y -qq --no-install-recommends "$SRC" >/dev/null 2>&1 || {
        apt-get update -qq
        apt-get build-dep -y -qq --no-install-recommends "$SRC" >/dev/null
    }
    deps_ok || { dpkg-checkbuilddeps "$SRC/debian/control" || true; die "build dependencies still missing"; }
fi

# The source tree: what git knows of (tracked and untracked, not ignored), else everything.
upstream=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$SRC/pruned/__init__.py")
[[ -n $upstream ]] || die "no __version__ in $SRC/pruned/__init__.py"
tree=$WORK/pruned-$upstream
mkdir -p "$tree"
if git -C "$SRC" rev-parse --show-toplevel >/dev/null 2>&1; then
    (cd "$SRC" && git ls-files -z -co --exclude-standard) |
        (cd "$SRC" && xargs -0 -r cp -a --parents -t "$tree" 2>/dev/null) || true
else
    (cd "$SRC" && tar --exclude=./.venv --exclude=./build --exclude=./.git -cf - .) |
        tar -xf - -C "$tree"
fi
[[ -f $tree/debian/rules && -d $tree/pruned ]] || die "could not copy $SRC to $tree"
chmod +x "$tree/debian/rules"

if [[ -n $VERSION ]]; then
    [[ ${VERSION%%[+~-]*} == "$upstream" ]] || die "--version $VERSION: upstream part must be $upstream"
    {
        printf 'pruned (%s) bookworm; urgency=medium\n\n  * Rebuilt as %s by scripts/build-deb.sh --version.\n\n' \
            "$VERSION" "$VERSION"
        printf ' -- %s  %s\n\n' "$(dpkg-parsechangelog -l "$tree/debian/changelog" -S Maintainer)" \
            "$(date -R)"
        cat "$tree/debian/changelog"
    } >"$tree/debian/changelog.new"
    mv "$tree/debian/changelog.new" "$tree/debian/changelog"
fi
version=$(dpkg-parsechangelog -l "$tree/debian/changelog" -S Version)

log "building pruned $version in $tree"
# Debian's own python3 and tools, whatever PATH, venv or pyenv the caller has.
if ! (cd "$tree" && env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV \
        PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b) >"$WORK/build.log" 2>&1; then
    tail -n 40 "$WORK/build.log" >&2
    cp "$WORK/build.log" "$OUT/build.log"
    die "dpkg-buildpackage failed (full log: $OUT/build.log)"
fi
cp "$WORK/build.log" "$OUT/build.log"
deb=pruned_${version}_all.deb
for f in "$WORK/$deb" "$WORK"/pruned_"${version}"_*.buildinfo "$WORK"/pruned_"${version}"_*.changes; do
    [[ -e $f ]] && cp "$f" "$OUT/"
done
[[ -f $OUT/$deb ]] || die "no $deb was built"

if ((LINTIAN)) && command -v lintian >/dev/null; then
    log "lintian $deb"
    # Errors fail the build; warnings are printed (debian/README.source says which are kept).
    lintian --fail-on error --tag-display-limit 0 "$OUT/$deb" >&2 || die "lintian found errors in $deb"
fi
echo "$OUT/$deb"

#!/usr/bin/env bash
# Build one cached node image of the VM lane: a Debian root fs (mmdebstrap, packages.txt) with
# systemd as PID 1, its kernel and initrd, and the two units that hand each boot to the
# per-run payload (image/*.service). Called by run.sh; this file, packages.txt and image/ are
# the image's cache key, so any edit here rebuilds the image.
#
# Usage: image.sh build RELEASE MIRROR OUTDIR   writes OUTDIR/{root.img,vmlinuz,initrd.img,
#                                               packages.lst,build.log}
#        image.sh customize ROOTFS              (mmdebstrap's customize hook; internal)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
HOSTNAME_VM=vmnode   # = Slurm's NodeName in guest/setup.sh

customize() {
    local root=$1
    echo "$HOSTNAME_VM" >"$root/etc/hostname"
    # Slurm resolves its own node name; harness.md section 6 maps it to 127.0.0.1.
    printf '127.0.0.1\tlocalhost %s\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
        "$HOSTNAME_VM" >"$root/etc/hosts"
    # The kernel mounts the root rw (root=LABEL=vmroot rw); pass 0: no fsck of a throw-away
    # overlay.
    printf 'LABEL=vmroot / ext4 defaults 0 0\n' >"$root/etc/fstab"
    # A fixed machine id: no first-boot logic (systemd-firstboot, presets) in any run.
    od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$root/etc/machine-id"
    echo >>"$root/etc/machine-id"

    install -m 644 "$HERE"/image/pruned-vm-setup.service "$HERE"/image/pruned-vm-run.service \
        "$root/etc/systemd/system/"
    chroot "$root" systemctl enable pruned-vm-setup.service pruned-vm-run.service
    chroot "$root" systemctl set-default multi-user.target
    # serial-getty on the console would vhangup ttyS0 (harness.md section 6). The timers only
    # burn emulated CPU during a run (apt has no network here anyway).
    chroot "$root" systemctl mask serial-getty@ttyS0.service getty@tty1.service \
        apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
        fstrim.timer man-db.timer
    # The package list as installed, for the run's report and for debugging a cached image.
    chroot "$root" dpkg-query -W -f='${Package} ${Version}\n' >"$root/etc/pruned-vm-packages"
}

build() {
    local release=$1 mirror=$2 out=$3 pkgs root kver
    mkdir -p "$out"
    root=$out/rootfs
    pkgs=$(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$HERE/packages.txt" | paste -sd,)
    # --mode=root: we are root, and the tree must carry real ownership for mkfs.ext4 -d.
    # No Recommends: the image holds exactly packages.txt and its dependencies.
    # Check-Valid-Until false: Debian testing's (forky's) Release file is often past its
    # Valid-Until on mirrors (harness.md section 6); stable suites are unaffected.
    mmdebstrap --mode=root --variant=apt --format=directory \
        --aptopt='APT::Install-Recommends "false"' \
        --aptopt='Acquire::Check-Valid-Until "false"' \
        --include="$pkgs" \
        --customize-hook="bash '$HERE/image.sh' customize \"\$1\"" \
        "$release" "$root" "deb $mirror $release main"

    # mmdebstrap unmounts what it mounted; never go on (and rm -rf) with a host mount inside.
    # (awk reads all of findmnt's output: `| grep -q` would SIGPIPE it and, under pipefail,
    # report no match exactly when there is one.)
    if findmnt -rn -o TARGET | awk -v r="$root/" 'index($0, r) == 1 { f = 1 } END { exit !f }'; then
        echo "image.sh: mounts left under $root; not removing it" >&2
        return 1
    fi
    kver=$(basename "$(ls -d "$root"/lib/modules/* | sort -V | tail -n1)")
    install -m 444 "$root/boot/vmlinuz-$kver" "$out/vmlinuz"
    install -m 444 "$root/boot/initrd.img-$kver" "$out/initrd.img"
    cp "$root/etc/pruned-vm-packages" "$out/packages.lst"

    # Room for the run's writes (each run writes to its own qcow2 overlay, not to this file).
    local used size
    used=$(du -sm --apparent-size "$root" | cut -f1)
    size=$((used + 1536))
    truncate -s "${size}M" "$out/root.img.tmp"
    mkfs.ext4 -q -F -L vmroot -d "$root" "$out/root.img.tmp"
    # --one-file-system: belt and braces against a bind mount the check above missed.
    rm -rf --one-file-system "$root"
    chmod 444 "$out/root.img.tmp"
    mv "$out/root.img.tmp" "$out/root.img"
}

case ${1:-} in
    build) shift; build "$@"; exit ;;
    customize) shift; customize "$@"; exit ;;
    *) echo "usage: image.sh build RELEASE MIRROR OUTDIR" >&2; exit 2 ;;
esac

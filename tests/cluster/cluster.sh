#!/usr/bin/env bash
# A real single-node Slurm 22.05 test cluster on this machine: munged, slurmctld, slurmd,
# sshd on 127.0.0.1:2222 with pam_access + pam_slurm_adopt, and systemd-journald, all started
# by hand (PID 1 need not be systemd). What works and why is in /work/shared/harness.md.
#
# Usage: cluster.sh install [--base] | up | down | status | restart-slurm
#                   | journald-start | journald-stop [--remove-socket] | pam-reload
#
# Everything lives in $PRUNED_CLUSTER_DIR (default /run/pruned-test-cluster). Every daemon this
# script starts is recorded in $DIR/pids/<name>.pid and is stopped by that PID only, after a check
# that the PID still runs the expected program. Settings (read by up and restart-slurm):
#   PRUNED_TEST_PROCTRACK   cgroup (default) | linuxproc | pgid
#   PRUNED_TEST_EPILOG      absolute path for Slurm's Epilog= (default: none)
#   PRUNED_TEST_PROLOG      absolute path for Slurm's Prolog= (default: none)
#   PRUNED_TEST_SSH_NO_JOBS pam_slurm_adopt action_no_jobs: deny (default) | ignore
#   PRUNED_TEST_SSH_PORT    sshd port (default 2222)
set -euo pipefail

DIR=${PRUNED_CLUSTER_DIR:-/run/pruned-test-cluster}
NODE=$(hostname -s)
SSH_PORT=${PRUNED_TEST_SSH_PORT:-2222}
PROCTRACK=${PRUNED_TEST_PROCTRACK:-cgroup}
EPILOG=${PRUNED_TEST_EPILOG:-}
PROLOG=${PRUNED_TEST_PROLOG:-}
NO_JOBS=${PRUNED_TEST_SSH_NO_JOBS:-deny}
JC_BASE=$DIR/jc
CG_ROOT=slurm_$NODE
ETC_SLURM=/etc/slurm
SLURM_FILES=(slurm.conf cgroup.conf job_container.conf)
JOURNAL_DIR=/run/systemd/journal
JOURNALD=/lib/systemd/systemd-journald

# Everything the whole test suite needs (the cluster, building systemd-python, the fixtures).
BASE_PKGS=(python3-venv python3-dev gcc pkg-config libsystemd-dev python3-systemd
           util-linux procps)
CLUSTER_PKGS=(slurm-wlm slurmctld slurmd slurm-client munge libpam-slurm-adopt
              openssh-server openssh-client iproute2)

log() { printf 'cluster: %s\n' "$*" >&2; }
die() { printf 'cluster: error: %s\n' "$*" >&2; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root"; }

# ---- processes -------------------------------------------------------------------------------

# True if PID exists and is not a zombie (PID 1 here reaps lazily, so Z counts as gone).
alive() {
    local pid=$1 stat
    [[ -n $pid ]] || return 1
    read -r stat 2>/dev/null <"/proc/$pid/stat" || return 1
    stat=${stat##*') '}
    [[ ${stat%% *} != Z && ${stat%% *} != X ]]
}

comm_of() {
    local c=
    read -r c 2>/dev/null <"/proc/$1/comm" || true
    echo "$c"
}

# PID recorded for one of our daemons, if it still runs the expected program; else empty.
our_pid() {
    local name=$1 comm=$2 pid
    pid=$(cat "$DIR/pids/$name.pid" 2>/dev/null) || return 0
    if alive "$pid" && [[ $(comm_of "$pid") == "$comm" ]]; then
        echo "$pid"
    fi
}

# PIDs (not zombies) whose comm is exactly $1.
# pgrep, not a bash loop over /proc: the table may hold tens of thousands of processes.
pids_by_comm() {
    local pid
    for pid in $(pgrep -x -- "$1" || true); do
        alive "$pid" && echo "$pid"
    done
    return 0
}

# PIDs running $comm that this script did not start (another cluster, a distro unit...).
foreign_pids() {
    local name=$1 comm=$2 mine pid
    mine=$(our_pid "$name" "$comm")
    for pid in $(pids_by_comm "$comm"); do
        [[ $pid == "$mine" ]] || echo "$pid"
    done
}

# The audit loginuid of job processes must be unset, as under a real slurmd unit.
unset_loginuid() {
    [[ $(cat /proc/self/loginuid 2>/dev/null) == 4294967295 ]] && return 0
    echo 4294967295 >/proc/self/loginuid 2>/dev/null || true
}

# start_daemon NAME ARGV...: start in its own session, record its PID.
start_daemon() {
    local name=$1; shift
    # No job control in a script, so the subshell is no process-group leader and setsid does not
    # fork: $! is the daemon's own PID.
    ( unset_loginuid; exec setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 ) &
    echo $! >"$DIR/pids/$name.pid"
}

# stop_daemon NAME COMM: SIGTERM our recorded PID, wait, SIGKILL if it lingers.
stop_daemon() {
    local name=$1 comm=$2 pid i
    pid=$(our_pid "$name" "$comm")
    rm -f "$DIR/pids/$name.pid"
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        alive "$pid" || { log "stopped $name ($pid)"; return 0; }
        sleep 0.1
    done
    log "$name ($pid) ignored SIGTERM; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

# wait_for SECONDS DESCRIPTION CMD...: poll CMD until it succeeds.
wait_for() {
    local secs=$1 what=$2 i; shift 2
    for ((i = 0; i < secs * 5; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "timed out after ${secs}s waiting for $what (logs in $DIR/log)"
}

port_listening() {  # 127.0.0.1 or 0.0.0.0 listener on TCP port $1 (state 0A = LISTEN)
    local hex
    hex=$(printf '%04X' "$1")
    awk -v p=":$hex" '$4 == "0A" && ($2 == "0100007F" p || $2 == "00000000" p) {f=1} END {exit !f}' \
        /proc/net/tcp
}

# ---- configuration ---------------------------------------------------------------------------

write_slurm_conf() {
    local cpus sockets cores threads hw
    hw=$(slurmd -C | head -n1)
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    sockets=$(sed -n 's/.* SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")
    cores=$(sed -n 's/.* CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")
    threads=$(sed -n 's/.* ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")
    case $PROCTRACK in cgroup | linuxproc | pgid) ;; *) die "PRUNED_TEST_PROCTRACK=$PROCTRACK: want cgroup, linuxproc or pgid" ;; esac
    local f
    for f in "$EPILOG" "$PROLOG"; do
        [[ -z $f || ( $f == /* && -x $f ) ]] || die "epilog/prolog $f: not an absolute path to an executable"
    done
    cat >"$DIR/etc/slurm.conf" <<EOF
# Written by tests/cluster/cluster.sh; regenerated on every up/restart-slurm.
ClusterName=pruned-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=debug
ProctrackType=proctrack/$PROCTRACK
TaskPlugin=task/cgroup
PrologFlags=contain
JobContainerType=job_container/tmpfs
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# Quick teardown: test processes die on SIGTERM, no need for the default 30 s.
KillWait=2
InactiveLimit=0
${EPILOG:+Epilog=$EPILOG}
${PROLOG:+Prolog=$PROLOG}
NodeName=$NODE CPUs=$cpus Boards=1 SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=1000 NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    # ConstrainRAMSpace/Devices stay off: they would move job processes out of the machine's
    # own memory cgroup (harness.md).
    cat >"$DIR/etc/cgroup.conf" <<EOF
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainCores=yes
EOF
    cat >"$DIR/etc/job_container.conf" <<EOF
AutoBasePath=true
BasePath=$JC_BASE
EOF
}

write_pam() {
    case $NO_JOBS in deny | ignore) ;; *) die "PRUNED_TEST_SSH_NO_JOBS=$NO_JOBS: want deny or ignore" ;; esac
    local tmp=$DIR/etc/pam.sshd.new
    awk -v acc="$DIR/etc/access.conf" -v nj="$NO_JOBS" '
        { print }
        /^@include[ \t]+common-account/ {
            print "account    sufficient   pam_access.so accessfile=" acc
            print "account    required     pam_slurm_adopt.so action_no_jobs=" nj " log_level=debug5"
            done = 1
        }
        END { exit !done }' /etc/pam.d/sshd >"$tmp" || die "/etc/pam.d/sshd has no '@include common-account' line"
    # Rewrite in place: sshd sees this file through a bind mount of its inode.
    cat "$tmp" >"$DIR/etc/pam.sshd"
    rm -f "$tmp"
}

write_configs() {
    install -d -m 755 "$DIR" "$DIR/etc" "$DIR/run" "$DIR/pids" "$DIR/log" "$DIR/spool"
    install -d -m 755 -o slurm -g slurm "$DIR/spool/ctld"
    install -d -m 755 "$DIR/spool/slurmd"
    # slurmctld writes its log after dropping to SlurmUser.
    touch "$DIR/log/slurmctld.log" && chown slurm:slurm "$DIR/log/slurmctld.log"
    write_slurm_conf
    [[ -f $DIR/etc/access.conf ]] || printf '# pam_access for the test sshd: tests add "+:USER:ALL" above the last line\n-:ALL:ALL\n' >"$DIR/etc/access.conf"
    chmod 644 "$DIR/etc/access.conf"
    write_pam
    [[ -f $DIR/etc/ssh_host_ed25519_key ]] ||
        ssh-keygen -q -t ed25519 -N '' -C pruned-test-host -f "$DIR/etc/ssh_host_ed25519_key"
    cat >"$DIR/etc/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $DIR/etc/ssh_host_ed25519_key
PidFile $DIR/run/sshd.pid
UsePAM yes
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AuthorizedKeysFile .ssh/authorized_keys
PrintMotd no
LogLevel VERBOSE
EOF
}

# Clients and pruned itself read /etc/slurm/slurm.conf; point it at ours, never over a real one.
link_etc_slurm() {
    local f
    install -d -m 755 "$ETC_SLURM"
    for f in "${SLURM_FILES[@]}"; do
        if [[ -e $ETC_SLURM/$f && ! -L $ETC_SLURM/$f ]]; then
            die "$ETC_SLURM/$f is a real file; refusing to replace this host's Slurm config"
        fi
        ln -sfn "$DIR/etc/$f" "$ETC_SLURM/$f"
    done
}

unlink_etc_slurm() {
    local f
    for f in "${SLURM_FILES[@]}"; do
        if [[ -L $ETC_SLURM/$f && $(readlink "$ETC_SLURM/$f") == "$DIR/etc/$f" ]]; then
            rm -f "$ETC_SLURM/$f"
        fi
    done
}

# ---- components ------------------------------------------------------------------------------

journald_start() {
    if [[ -n $(pids_by_comm systemd-journal) ]]; then
        log "journald already running"
    else
        # A stale socket from a dead journald would make senders fail with ECONNREFUSED.
        rm -rf "$JOURNAL_DIR"
        start_daemon journald "$JOURNALD"
        wait_for 10 "journald socket" test -S "$JOURNAL_DIR/socket"
    fi
    # Normally systemd-journald-dev-log.socket makes /dev/log; PAM logs are lost without it.
    if [[ ! -e /dev/log ]]; then
        ln -sfn "$JOURNAL_DIR/dev-log" /dev/log
        touch "$DIR/pids/dev-log.made"
    fi
}

journald_stop() {
    stop_daemon journald systemd-journal
    if [[ ${1:-} == --remove-socket && -z $(pids_by_comm systemd-journal) ]]; then
        rm -rf "$JOURNAL_DIR"
    fi
}

munge_start() {
    if [[ -n $(pids_by_comm munged) ]] && munge -n | unmunge >/dev/null 2>&1; then
        log "using the munged already running"
        return 0
    fi
    [[ -z $(pids_by_comm munged) ]] || die "a munged runs but does not answer; not starting another"
    install -d -o munge -g munge -m 755 /run/munge
    start_daemon munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F --force
    wait_for 10 "munged" sh -c 'munge -n | unmunge'
}

slurm_start() {
    start_daemon slurmctld /usr/sbin/slurmctld -D -c
    wait_for 30 "slurmctld (scontrol ping)" sh -c 'scontrol ping | grep -q "is UP"'
    start_daemon slurmd /usr/sbin/slurmd -D
    wait_for 60 "node $NODE idle" sh -c "sinfo -h -n '$NODE' -o %T | grep -qx idle"
}

# Cancel every job of our cluster and wait (bounded) for them to leave the queue.
cancel_all_jobs() {
    local ids i
    [[ -n $(our_pid slurmctld slurmctld) ]] || return 0
    ids=$(squeue -h -o %i 2>/dev/null) || return 0
    [[ -n $ids ]] || return 0
    log "cancelling jobs: $(echo $ids)"
    scancel $ids 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        [[ -z $(squeue -h -o %i 2>/dev/null) ]] && return 0
        sleep 0.2
    done
    log "jobs still in the queue after 20 s: $(squeue -h -o '%i %T' | tr '\n' ' ')"
}

# PIDs left in this cluster's job cgroups (crashed stepds, the extern step's root sleep).
cgroup_leftovers() {
    local root=/sys/fs/cgroup/freezer/$CG_ROOT
    [[ -d $root ]] || return 0
    { find "$root" -mindepth 2 -name cgroup.procs -exec cat {} + 2>/dev/null || true; } | sort -un
}

slurm_stop() {
    cancel_all_jobs
    stop_daemon slurmd slurmd
    stop_daemon slurmctld slurmctld
    # slurmctld leaves its pid file behind, and a stale /run/slurmctld.pid breaks the package's
    # prerm; ours lives in $DIR but clean the default one too when nothing runs it.
    local f pid
    for f in /run/slurmctld.pid "$DIR/run/slurmctld.pid" "$DIR/run/slurmd.pid"; do
        pid=$(cat "$f" 2>/dev/null) || continue
        alive "$pid" && [[ $(comm_of "$pid") == slurm* ]] || rm -f "$f"
    done
    # Whatever still sits in our job cgroups was started by this cluster's jobs.
    local pids
    pids=$(cgroup_leftovers)
    if [[ -n $pids ]]; then
        log "killing leftovers in $CG_ROOT job cgroups: $(echo $pids)"
        kill -KILL $pids 2>/dev/null || true
        sleep 0.3
    fi
    # The stepds of a crashed job leave bind + nsfs mounts under BasePath; deepest first.
    local mp
    while read -r mp; do
        umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || log "could not unmount $mp"
    done < <(awk -v b="$JC_BASE" 'index($5, b "/") == 1 || $5 == b {print $5}' /proc/self/mountinfo | sort -r)
    rm -rf "$JC_BASE" "$DIR/spool/ctld" "$DIR/spool/slurmd"
    # rmdir only removes empty cgroups, so nothing that still runs is touched.
    local c
    for c in /sys/fs/cgroup/*/"$CG_ROOT"; do
        if [[ -d $c ]]; then
            find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true
        fi
    done
    return 0
}

sshd_start() {
    install -d -m 755 /run/sshd
    /usr/sbin/sshd -t -f "$DIR/etc/sshd_config" || die "sshd -t rejects $DIR/etc/sshd_config"
    # PAM service name is always "sshd": give this sshd its own /etc/pam.d/sshd through a bind
    # mount in a private mount namespace, so the host's file is never edited.
    start_daemon sshd unshare --mount --propagation private sh -c \
        'mount --bind "$1" /etc/pam.d/sshd && exec /usr/sbin/sshd -D -f "$2" -E "$3"' \
        sh "$DIR/etc/pam.sshd" "$DIR/etc/sshd_config" "$DIR/log/sshd.log"
    wait_for 10 "sshd on 127.0.0.1:$SSH_PORT" port_listening "$SSH_PORT"
}

# ---- subcommands -----------------------------------------------------------------------------

cmd_install() {
    need_root
    local pkgs=("${BASE_PKGS[@]}")
    [[ ${1:-} == --base ]] || pkgs+=("${CLUSTER_PKGS[@]}")
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' postinsts from starting munge/slurm/ssh units: this script starts them.
    local made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local rc=0
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${pkgs[@]}"; } || rc=$?
    ((made_policy)) && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get failed (exit $rc)"
    if [[ ${1:-} != --base ]] && ! getent hosts "$NODE" >/dev/null; then
        log "adding '127.0.0.1 $NODE' to /etc/hosts"
        echo "127.0.0.1 $NODE" >>/etc/hosts
    fi
}

cmd_up() {
    need_root
    local bin
    for bin in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/munged /usr/sbin/sshd "$JOURNALD"; do
        [[ -x $bin ]] || die "$bin missing: run '$0 install' first"
    done
    local name comm running=() partial=0
    for name in munged:munged slurmctld:slurmctld slurmd:slurmd sshd:sshd journald:systemd-journal; do
        [[ -n $(our_pid "${name%%:*}" "${name#*:}") ]] && running+=("${name%%:*}")
    done
    if [[ -n $(our_pid slurmctld slurmctld) && -n $(our_pid slurmd slurmd) && -n $(our_pid sshd sshd) ]]; then
        log "already up (work dir $DIR)"
        return 0
    fi
    for name in slurmctld slurmd sshd; do
        [[ -n $(our_pid "$name" "$name") ]] && partial=1
    done
    ((partial == 0)) || die "partly up (${running[*]}); run '$0 down' first"
    # A second slurmctld SIGTERMs the first and takes over: never start next to another one.
    for comm in slurmctld slurmd; do
        [[ -z $(foreign_pids "$comm" "$comm") ]] ||
            die "a $comm not started by this harness runs (pid $(foreign_pids "$comm" "$comm" | tr '\n' ' ')); refusing"
    done
    port_listening 6817 && die "port 6817 (slurmctld) is taken; refusing"
    port_listening 6818 && die "port 6818 (slurmd) is taken; refusing"
    port_listening "$SSH_PORT" && die "port $SSH_PORT is taken; refusing"

    write_configs
    link_etc_slurm
    journald_start
    munge_start
    slurm_start
    sshd_start
    log "up: node $NODE idle, sshd 127.0.0.1:$SSH_PORT, proctrack/$PROCTRACK, work dir $DIR"
}

cmd_down() {
    need_root
    slurm_stop
    stop_daemon sshd sshd
    stop_daemon munged munged
    # Leave no stale socket behind: with none, senders drop entries instead of failing.
    journald_stop --remove-socket
    if [[ -f $DIR/pids/dev-log.made && -z $(pids_by_comm systemd-journal) ]]; then
        [[ $(readlink /dev/log) == "$JOURNAL_DIR/dev-log" ]] && rm -f /dev/log
        rm -f "$DIR/pids/dev-log.made"
    fi
    unlink_etc_slurm
    log "down"
}

cmd_restart_slurm() {
    need_root
    [[ -n $(our_pid sshd sshd) ]] || die "not up; run '$0 up'"
    slurm_stop
    write_configs
    slurm_start
    log "slurm restarted: proctrack/$PROCTRACK${EPILOG:+ epilog=$EPILOG}${PROLOG:+ prolog=$PROLOG}, ssh no-jobs=$NO_JOBS"
}

cmd_status() {
    local ok=0 name comm pid
    for name in munged:munged slurmctld:slurmctld slurmd:slurmd sshd:sshd journald:systemd-journal; do
        comm=${name#*:}; name=${name%%:*}
        pid=$(our_pid "$name" "$comm")
        if [[ -n $pid ]]; then
            echo "$name: up (pid $pid)"
        elif [[ -n $(pids_by_comm "$comm") ]]; then
            echo "$name: running, not ours (pid $(pids_by_comm "$comm" | tr '\n' ' '))"
            [[ $name == munged || $name == journald ]] || ok=1
        else
            echo "$name: down"; ok=1
        fi
    done
    if [[ -n $(our_pid slurmctld slurmctld) ]]; then
        local state
        state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || echo unknown)
        echo "node $NODE: $state"
        case $state in idle | mixed | allocated | completing) ;; *) ok=1 ;; esac
        grep -h '^ProctrackType=\|^Epilog=\|^Prolog=' "$DIR/etc/slurm.conf" || true
    fi
    echo "workdir: $DIR"
    return $ok
}

main() {
    local cmd=${1:-}
    shift || true
    case $cmd in
        install) cmd_install "$@" ;;
        up) cmd_up ;;
        down) cmd_down ;;
        status) cmd_status ;;
        restart-slurm) cmd_restart_slurm ;;
        journald-start) need_root; install -d "$DIR/pids" "$DIR/log"; journald_start ;;
        journald-stop) need_root; journald_stop "$@" ;;
        pam-reload) need_root; write_pam ;;
        *) echo "usage: $0 install [--base] | up | down | status | restart-slurm | journald-start | journald-stop [--remove-socket] | pam-reload" >&2
           exit 2 ;;
    esac
}

main "$@"

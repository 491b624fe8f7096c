#!/bin/bash
# Runs inside the VM at every boot, from pruned-vm-setup.service, before munge, slurmctld,
# slurmd and ssh start: configures this boot's node as harness.md section 6 describes.
# (Lives on the per-run payload disk, so editing it never rebuilds the cached image.)
set -euo pipefail

NODE=$(hostname -s)
P=/run/pruned-vm

# Slurm fails with "Unable to resolve" when the node has only a loopback interface
# (getaddrinfo's AI_ADDRCONFIG ignores lo). A dummy interface with a documentation address
# (RFC 5737) fixes that; no packet can leave: the VM has no network device at all.
ip link set lo up
ip link add dummy0 type dummy
ip link set dummy0 up
ip addr add 192.0.2.1/32 dev dummy0

# ---- Slurm -----------------------------------------------------------------------------------
hw=$(slurmd -C 2>/dev/null | head -n1 || true)
field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$hw"; }
cpus=$(field CPUs); sockets=$(field SocketsPerBoard); cores=$(field CoresPerSocket)
threads=$(field ThreadsPerCore)
: "${cpus:=$(nproc)}" "${sockets:=1}" "${cores:=$(nproc)}" "${threads:=1}"

install -d -o slurm -g slurm -m 755 /var/lib/slurm /var/lib/slurm/slurmd /var/lib/slurm/slurmctld
install -d -m 755 /etc/slurm
# PrologFlags=Contain (pam_slurm_adopt needs the extern step). scenarios/test_runinjob.py
# switches to Contain,RunInJob (24.11+) for its own phase, once no job with dead slurmstepds is
# left: with RunInJob the epilog runs inside the job's extern slurmstepd, and a job whose
# slurmstepds were killed (scene.py's dave) then never completes -- slurmctld resends
# TERMINATE_JOB every 60 s, the job stays COMPLETING and the node takes no further job (seen on
# trixie, tests/vm/README.md).
prolog_flags=Contain
# Epilog= as README "Slurm Prolog/Epilog" sets it up: a glob over a directory with pruned-epilog
# beside the site's own scripts. The two witnesses around it record, for
# scenarios/test_epilog.py, that they ran (22.05 stops the chain after a failing script) and
# in which order (24.11+ run them in reverse name order).
install -d -m 755 /etc/slurm/epilog.d
ln -sfn /usr/sbin/pruned-epilog /etc/slurm/epilog.d/10-pruned
for w in 05-vm-witness 95-vm-witness; do
    cat >/etc/slurm/epilog.d/$w <<'EOF'
#!/bin/sh
# VM lane witness: that it ran, when, in which cgroup, and how many of test_epilog's escaped
# daemons lived.
n=$(pgrep -c -f '^vm_epi_daemon' 2>/dev/null)
cg=$(sed -n 's/^0:://p' /proc/self/cgroup)
echo "$(basename "$0") job=$SLURM_JOB_ID daemons=${n:-0} t=$(date +%s.%N) cg=$cg" >>/run/pruned-vm-epilog.log
exit 0
EOF
    chmod 755 /etc/slurm/epilog.d/$w
done
cat >/etc/slurm/slurm.conf <<EOF
# Written by tests/vm/guest/setup.sh at boot.
ClusterName=vm
SlurmctldHost=$NODE(127.0.0.1)
# 26.05's slurmctld unit runs as User=slurm and exits unless SlurmUser says so.
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
PrologFlags=$prolog_flags
Epilog=/etc/slurm/epilog.d/*
PrologEpilogTimeout=120
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
InactiveLimit=0
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE CPUs=$cpus Boards=1 SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=1000 NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
cat >/etc/slurm/cgroup.conf <<EOF
CgroupPlugin=cgroup/v2
ConstrainCores=yes
EOF

# ---- test users -----------------------------------------------------------------------------
# alice: a job, ssh adopted into it; bob: a stray outside Slurm and a lingering systemd --user;
# carol: an admin allowed in by pam_access without a job (and whitelisted in pruned's policy);
# dave: a job whose slurmstepds are killed (its processes are left behind); erin: a job and a
# stray that pruned adopts into it; frank: let in by pam_access but not whitelisted (a login
# that bypassed adoption).
# grace: test_epilog's jobs that leave a daemon behind; henry: test_cleanup's job that leaves
# files; ivan (let in by pam_access) and judy (a job): test_pam_systemd's logins.
USERS=(alice bob carol dave erin frank grace henry ivan judy)
uid=2001
for u in "${USERS[@]}"; do
    id "$u" >/dev/null 2>&1 || useradd -m -u "$uid" -s /bin/bash "$u"
    uid=$((uid + 1))
done

# ---- sshd with pam_access + pam_slurm_adopt (harness.md section 2) -----------------------
install -d -m 700 /root/.ssh
[[ -f /root/.ssh/vm_key ]] || ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/vm_key
for u in "${USERS[@]}"; do
    install -d -o "$u" -g "$u" -m 700 "/home/$u/.ssh"
    install -o "$u" -g "$u" -m 600 /root/.ssh/vm_key.pub "/home/$u/.ssh/authorized_keys"
done
cat >/etc/ssh/sshd_config.d/pruned-vm.conf <<'EOF'
# Loopback only; key logins; PAM for pam_access + pam_slurm_adopt.
ListenAddress 127.0.0.1
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UsePAM yes
EOF
cat >/etc/security/access-pruned-vm.conf <<'EOF'
+:carol:ALL
+:frank:ALL
+:ivan:ALL
-:ALL:ALL
EOF
# Right after the common account stack: the admin passes pam_access ("sufficient") and skips
# pam_slurm_adopt; everyone else must have a job to get in (action_no_jobs=deny).
if ! grep -q pam_slurm_adopt /etc/pam.d/sshd; then
    sed -i '/^@include[[:space:]]\+common-account/a\
account    sufficient   pam_access.so accessfile=/etc/security/access-pruned-vm.conf\
account    required     pam_slurm_adopt.so action_no_jobs=deny' /etc/pam.d/sshd
fi
# Slurm's pam_slurm_adopt documentation: pam_systemd must not run for sshd, or it moves the
# adopted session out of the job into a logind session scope. Keep it for other services.
grep -v pam_systemd /etc/pam.d/common-session >/etc/pam.d/common-session-sshd
sed -i 's/^@include[[:space:]]\+common-session$/@include common-session-sshd/' /etc/pam.d/sshd

# man-db's dpkg trigger rebuilds the man page index on every (de)install: under TCG that costs
# more than the rest of an apt run. Debian's switch for it; `man pruned` needs no index.
rm -f /var/lib/man-db/auto-update

# PRUNED_VM_DEBUG=1 on the host: a root shell on ttyS2 (a unix socket there), for looking
# around a running guest. Never in a normal run.
if [[ -e $P/debug ]]; then
    systemd-run --no-block --unit=pruned-vm-debug-shell -p TTYPath=/dev/ttyS2 \
        -p StandardInput=tty -p StandardOutput=tty -p StandardError=tty \
        -p Restart=always /bin/bash -il
fi

echo "setup.sh: node $NODE configured (CPUs=$cpus)"

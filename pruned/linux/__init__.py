"""The kernel's interfaces, and nothing else: /proc, /sys/fs/cgroup, netlink, syscalls.

No policy, job or rule knowledge lives here: each module reads or changes one kind of
kernel object and turns OS errors into plain results at that one boundary.
"""

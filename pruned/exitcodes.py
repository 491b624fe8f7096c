"""Exit codes. The systemd unit and Slurm rely on them, so they never change meaning."""

EX_OK = 0
EX_FAILED = 1  # something could not be killed or removed (an epilog exit that drains the node)
EX_USAGE = 2  # bad command line (argparse's own code)
EX_SOFTWARE = 70  # an internal error: a bug, reported in one line (PRUNED_DEBUG=1 for the trace)
EX_NOPERM = 77  # needs root for this command
EX_CONFIG = 78  # bad policy: RestartPreventExitStatus=78 stops systemd from restart-looping

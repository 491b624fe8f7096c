"""Attach this terminal to a VM lane guest's debug shell (PRUNED_VM_DEBUG=1 bash tests/vm/run.sh
prints the socket): python3 tests/vm/shell.py SOCKET. Ctrl-] leaves."""

from __future__ import annotations

import os
import select
import socket
import sys
import termios
import tty


def main(path: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    interactive = os.isatty(0)
    old = termios.tcgetattr(0) if interactive else None
    if interactive:
        tty.setraw(0)
    try:
        sock.sendall(b"\n")
        while True:
            ready, _, _ = select.select([0, sock], [], [])
            if sock in ready:
                data = sock.recv(4096)
                if not data:
                    return 0
                os.write(1, data)
            if 0 in ready:
                data = os.read(0, 4096)
                if not data or b"\x1d" in data:  # EOF or Ctrl-]
                    return 0
                sock.sendall(data)
    finally:
        if old is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, old)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

#!/usr/bin/python3
"""Run a command with its sock_diag netlink sockets under the test's control, through seccomp.

    /usr/bin/python3 tests/helpers/netlink_gate.py CONTROL_DIR -- COMMAND...

A seccomp filter (python3-seccomp, libseccomp) hands every ``socket(AF_NETLINK, *, NETLINK_SOCK_DIAG)``
the command makes to a supervisor process with SECCOMP_RET_USER_NOTIF; everything else runs untouched.
For each such call the supervisor looks at CONTROL_DIR:

- ``fail`` holds an errno name (EPERM, EPROTONOSUPPORT...): the call fails with it, as it does when a
  security module denies netlink or the kernel lacks sock_diag. Remove the file and calls work again.
- ``pause`` holds a network namespace inode (or nothing, for any): when the calling thread is in that
  namespace the file is consumed, ``paused`` is written (the inode and thread id), and the call waits until
  the test removes ``paused``. The command is then stopped mid-sweep at a known point, so the test can
  change the world under it (delete a namespace) and let it go on.
- neither: the call proceeds (SECCOMP_USER_NOTIF_FLAG_CONTINUE).

The command is exec'd in this process, so its pid is the one the test started; the supervisor is a
forked child that dies with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import sys
import time

import seccomp  # type: ignore[import-not-found,unused-ignore]  # a C extension without stubs

NETLINK_SOCK_DIAG = 4
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
PR_SET_PDEATHSIG = 1
PAUSE_LIMIT = 30.0  # seconds a paused call waits for the test at most, so a failed test cannot wedge it


def netns_inode(tid: int) -> int | None:
    try:
        link = os.readlink(f"/proc/{tid}/ns/net")
    except OSError:
        return None
    return int(link[5:-1])


def decide(control: str, tid: int) -> tuple[int, int]:
    """(error, flags) for one intercepted call, after any pause."""
    try:
        with open(os.path.join(control, "fail"), encoding="ascii") as f:
            name = f.read().strip()
        return -getattr(errno, name), 0
    except FileNotFoundError:
        pass
    pause = os.path.join(control, "pause")
    try:
        with open(pause, encoding="ascii") as f:
            wanted = f.read().strip()
    except FileNotFoundError:
        wanted = None
    if wanted is not None:
        inode = netns_inode(tid)
        if not wanted or str(inode) == wanted:
            os.unlink(pause)
            paused = os.path.join(control, "paused")
            with open(paused + ".tmp", "w", encoding="ascii") as f:
                f.write(f"{inode} {tid}\n")
            os.rename(paused + ".tmp", paused)
            deadline = time.monotonic() + PAUSE_LIMIT
            while os.path.exists(paused) and time.monotonic() < deadline:
                time.sleep(0.01)
    return 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE


def supervise(syscall_filter: seccomp.SyscallFilter, control: str) -> None:
    while True:
        try:
            notification = syscall_filter.receive_notify()
        except RuntimeError:
            # The notifying thread died meanwhile (ENOENT) or the filter has no more users.
            if os.getppid() == 1:
                return
            time.sleep(0.01)  # not a busy loop if the error persists
            continue
        error, flags = decide(control, notification.pid)
        try:
            syscall_filter.respond_notify(seccomp.NotificationResponse(notification, 0, error, flags))
        except RuntimeError:
            continue  # the caller went away while we waited: nothing to answer


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    control, command = sys.argv[1], sys.argv[3:]
    syscall_filter = seccomp.SyscallFilter(seccomp.ALLOW)
    syscall_filter.add_rule(seccomp.NOTIFY, "socket", seccomp.Arg(0, seccomp.EQ, socket.AF_NETLINK),
                            seccomp.Arg(2, seccomp.EQ, NETLINK_SOCK_DIAG))
    syscall_filter.load()
    parent = os.getpid()
    if os.fork() == 0:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the command already exited before the death signal was armed
            os._exit(0)
        # Not to hold the test's pipes open after the command exits.
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(devnull, fd)
        supervise(syscall_filter, control)
        os._exit(0)
    os.close(syscall_filter.get_notify_fd())
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())

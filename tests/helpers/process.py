"""Where the harness lives, and the one way it stops a process it started (tests and benchmarks alike)."""

from __future__ import annotations

import contextlib
import grp
import pwd
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HELPERS = Path(__file__).resolve().parent
REPO = HELPERS.parent.parent
PYTHON = sys.executable
REAP_TIMEOUT = 10.0  # after SIGKILL: only a process stuck in the kernel takes longer


def stop_process(popen: subprocess.Popen[Any], ask: Sequence[signal.Signals] = (), grace: float = 5.0) -> int:
    """Ask a child to go, then make it; its exit status. Safe to call again, and after it exited.

    A stdin pipe is closed first (end of input is how every helper here is told to stop, and also how it
    notices that its parent died); then each signal of ``ask`` is sent in turn. After each step it gets
    ``grace`` seconds to exit, and whatever is still running after the last one is killed.
    """
    steps: list[signal.Signals | None] = list(ask)
    if popen.stdin is not None:
        steps.insert(0, None)  # the closed pipe is the first ask
        if not popen.stdin.closed:
            with contextlib.suppress(BrokenPipeError):  # it already exited with unread input
                popen.stdin.close()
    for step in steps:
        if popen.poll() is not None:
            break
        if step is not None:
            popen.send_signal(step)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=grace)
    if popen.poll() is None:
        popen.kill()
    return popen.wait(timeout=REAP_TIMEOUT)


def kill_process(popen: subprocess.Popen[Any]) -> int:
    """SIGKILL and reap, without a grace period; safe to call again and after it exited."""
    return stop_process(popen, grace=0.0)


def user_group(user: str) -> str:
    return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name


def as_user(user: str | None, command: Sequence[str]) -> list[str]:
    """``command`` run as ``user`` and its primary group, without root's other groups (setpriv execs it,
    so its pid stays the command's); None: as we are."""
    if user is None:
        return list(command)
    return ["setpriv", f"--reuid={user}", f"--regid={user_group(user)}", "--clear-groups", *command]

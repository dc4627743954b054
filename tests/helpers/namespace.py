"""Throwaway network namespaces for the tests and benchmarks, and the helper processes run inside them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from tests.helpers.kernelview import SsListener, parse_nstat, parse_ss_tcp, parse_ss_unix
from tests.helpers.lineproto import HelperProcess
from tests.helpers.process import HELPERS, PYTHON, REPO, as_user, user_group

__all__ = ["HELPERS", "PYTHON", "REPO", "HelperProcess", "TestNamespace", "run", "user_group", "wait_until"]

COMMAND_TIMEOUT = 20.0

T = TypeVar("T")


def wait_until(probe: Callable[[], T | None], what: str, timeout: float = 5.0, interval: float = 0.02) -> T:
    """Call ``probe`` until it returns something truthy; polling replaces fixed sleeps."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value: {value!r}")
        time.sleep(interval)


def run(args: Sequence[str], env: dict[str, str] | None = None) -> str:
    """Run a command, fail with its stderr if it fails, return its stdout."""
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, env=env,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


class TestNamespace:
    """A named namespace (``ip netns add``) with loopback up and its own directory for Unix sockets.

    As a context manager (the benchmarks) it is destroyed on leaving; the tests' ``netns`` fixture
    destroys it after the test.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, name: str) -> None:
        if not name.startswith("aqt-"):
            raise ValueError(f"test namespace names start with aqt-: {name!r}")
        self.name = name
        self.helpers: list[HelperProcess] = []
        run(["ip", "netns", "add", name])
        self.deleted = False
        # Short, because sun_path holds at most 107 bytes.
        self.sockdir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        try:
            self.run("ip", "link", "set", "lo", "up")
        except BaseException:
            self.destroy()
            raise

    def __enter__(self) -> TestNamespace:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.destroy()

    @property
    def inode(self) -> int:
        return os.stat(f"/run/netns/{self.name}").st_ino

    def exec_args(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def run(self, *command: str, env: dict[str, str] | None = None) -> str:
        return run(self.exec_args(*command), env=env)

    def spawn(self, script: str, args: Sequence[str], tag: str, user: str | None = None) -> HelperProcess:
        """tests/helpers/SCRIPT ARGS inside the namespace (as ``user``), announcing itself with ``tag``."""
        helper = HelperProcess(self.exec_args(*as_user(user, [PYTHON, str(HELPERS / script), *args])), tag)
        self.helpers.append(helper)
        return helper

    def listen(self, *specs: str, forks: int = 0, user: str | None = None, life: float = 120.0,
               wait: bool = True) -> HelperProcess:
        """Start tests/helpers/listen.py with one ``--listen SPEC`` per spec."""
        args = [arg for spec in specs for arg in ("--listen", spec)]
        args += ["--forks", str(forks), "--life", str(life)]
        helper = self.spawn("listen.py", args, "READY", user=user)
        if wait:
            helper.ready()
        return helper

    def flood(self, targets: Sequence[tuple[str, int]], hold: float = 60.0, wait: bool = True) -> HelperProcess:
        """Start tests/helpers/flood.py: ``count`` non-blocking connects to each target, held open."""
        args = [arg for target, count in targets for arg in ("--to", target, str(count))]
        helper = self.spawn("flood.py", [*args, "--hold", str(hold)], "FLOODED")
        if wait:
            helper.ready()
        return helper

    def unix_path(self, name: str) -> str:
        return str(self.sockdir / name)

    # -p (owners) is asked for only when wanted: it reads every process's fds, 100 ms on a busy host.
    def ss_tcp(self, owners: bool = False) -> dict[str, SsListener]:
        return parse_ss_tcp(self.run("ss", "-ltnmeH" + ("p" if owners else "")))

    def ss_unix(self, owners: bool = False) -> dict[str, SsListener]:
        return parse_ss_unix(self.run("ss", "-xlmH" + ("p" if owners else "")))

    def ss_all(self, owners: bool = False) -> dict[str, SsListener]:
        return {**self.ss_tcp(owners), **self.ss_unix(owners)}

    def nstat(self) -> dict[str, int]:
        # -a: absolute values; -s: leave the history file alone; a private history file anyway,
        # so no other nstat user on the machine is disturbed or disturbs us.
        env = {**os.environ, "NSTAT_HISTORY": str(self.sockdir / "nstat.history")}
        return parse_nstat(self.run("nstat", "-asz", env=env))

    def sysctls(self, *names: str) -> dict[str, int]:
        values = self.run("sysctl", "-n", *names).split()
        assert len(values) == len(names), values
        return {name: int(value) for name, value in zip(names, values, strict=True)}

    def set_sysctl(self, name: str, value: int) -> None:
        self.run("sysctl", "-qw", f"{name}={value}")

    def pids(self) -> list[int]:
        return [int(pid) for pid in run(["ip", "netns", "pids", self.name]).split()]

    def delete(self) -> None:
        """Remove the name (the namespace itself lives on while a process is in it)."""
        if not self.deleted:
            run(["ip", "netns", "del", self.name])
            self.deleted = True

    def destroy(self) -> None:
        """Kill everything inside, reap our helpers, delete the namespace: safe to call after any failure."""
        if not self.deleted:
            deadline = time.monotonic() + 10
            while (pids := self.pids()) and time.monotonic() < deadline:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.02)
        for helper in self.helpers:
            with contextlib.suppress(ProcessLookupError):
                helper.popen.kill()
            helper.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)
        self.delete()


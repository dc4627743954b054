"""Throwaway network namespaces for the integration tests, and the helper processes run inside them."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from tests.helpers.kernelview import SsListener, parse_nstat, parse_ss_tcp, parse_ss_unix

HELPERS = Path(__file__).resolve().parent
REPO = HELPERS.parent.parent
PYTHON = sys.executable
COMMAND_TIMEOUT = 20.0
READY_TIMEOUT = 15.0

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


class HelperProcess:
    """A helper script in a namespace: it announces itself with one ``TAG {json}`` line, then
    answers one JSON line per command written to its stdin, and exits when stdin closes."""

    def __init__(self, args: list[str], tag: str) -> None:
        self.args = args
        self.tag = tag
        # A file, not a pipe, so a chatty helper can never block on a full stderr pipe.
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the helper; close()
        self.popen = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      bufsize=0, cwd=REPO)
        self._pending = b""
        self._announcement: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()

    def _readline(self, timeout: float) -> str:
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise AssertionError(f"{' '.join(self.args)}: no reply within {timeout} s; stderr: {self.stderr()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                self.popen.wait(timeout=5)
                raise AssertionError(f"{' '.join(self.args)} exited {self.popen.returncode}: {self.stderr()}")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.decode()

    def ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """The helper's announcement (pid, listeners, ...), waited for on first use."""
        if self._announcement is None:
            line = self._readline(timeout)
            word, _, payload = line.partition(" ")
            if word != self.tag:
                raise AssertionError(f"{' '.join(self.args)}: expected {self.tag}, got {line!r}")
            self._announcement = json.loads(payload)
        return self._announcement

    def request(self, command: str, timeout: float = 5.0) -> dict[str, Any]:
        self.ready()
        assert self.popen.stdin is not None
        self.popen.stdin.write(command.encode() + b"\n")
        reply: dict[str, Any] = json.loads(self._readline(timeout))
        if "error" in reply:
            raise AssertionError(f"{command!r} failed in the helper: {reply['error']}")
        return reply

    def stop(self, timeout: float = 5.0) -> None:
        """Close stdin, which ends the helper; kill it if it does not go."""
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.popen.stdin.close()
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=timeout)

    def close(self) -> None:
        self.stop()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._stderr.close()


class TestNamespace:
    """A named namespace (``ip netns add``) with loopback up and its own directory for Unix sockets."""

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

    @property
    def inode(self) -> int:
        return os.stat(f"/run/netns/{self.name}").st_ino

    def exec_args(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def run(self, *command: str, env: dict[str, str] | None = None) -> str:
        return run(self.exec_args(*command), env=env)

    def spawn(self, script: str, args: Sequence[str], tag: str, user: str | None = None) -> HelperProcess:
        command = [PYTHON, str(HELPERS / script), *args]
        if user is not None:
            command = ["setpriv", f"--reuid={user}", f"--regid={user_group(user)}", "--clear-groups", *command]
        helper = HelperProcess(self.exec_args(*command), tag)
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


def user_group(user: str) -> str:
    return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name

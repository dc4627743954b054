"""The line protocol every helper process speaks, both ends of it: tests/helpers/*.py run inside a
namespace on one side, the tests and benchmarks that started them on the other.

A helper writes one line per message on stdout, ``WORD {json object}`` (the object may be left out):
first an announcement (``READY``, ``FLOODED``, ...) once it is set up, then, for each command line it
reads on stdin, ``OK {...}`` or ``ERROR {"error": "..."}``. It exits when its stdin closes, which is
also what happens when its parent dies, or when its own time limit passes: a test or benchmark that is
killed cannot leave one behind for long.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

from tests.helpers.process import REPO, stop_process

READY_TIMEOUT = 15.0
REQUEST_TIMEOUT = 5.0
STOP_GRACE = 5.0
OK = "OK"
ERROR = "ERROR"


class HelperFailed(AssertionError):
    """A helper did not answer as the protocol says: what it said instead, its exit status and its stderr.

    An AssertionError, so a test shows it as the failure it is; benchmarks catch it to report it.
    """


# --- the helper's end ------------------------------------------------------------------------------------------


def say(word: str, /, **fields: Any) -> None:
    """One message to the parent."""
    print(f"{word} {json.dumps(fields)}", flush=True)


def stdin_closed(timeout: float = 0.0) -> bool:
    """True once the parent closed our stdin; waits up to ``timeout`` s for it. A load loop calls this now
    and then (not per connection: a select() costs about as much as a connect)."""
    readable, _, _ = select.select([sys.stdin.fileno()], [], [], timeout)
    return bool(readable) and not os.read(sys.stdin.fileno(), 4096)


def wait_for_stdin_close(seconds: float) -> None:
    """Hold on until stdin closes or ``seconds`` pass, whatever is written meanwhile."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        if stdin_closed(remaining):
            return


def commands(life: float) -> Iterator[list[str]]:
    """The words of each command line on stdin, until it closes or ``life`` seconds pass."""
    deadline = time.monotonic() + life
    pending = b""
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sys.stdin.fileno()], [], [], remaining)
        if not readable:
            return
        chunk = os.read(sys.stdin.fileno(), 4096)
        if not chunk:
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            yield line.decode().split()


def answer(fields: dict[str, Any]) -> None:
    """The reply to one command: OK with ``fields``, or ERROR when they hold an "error"."""
    say(ERROR if "error" in fields else OK, **fields)


# --- the parent's end ------------------------------------------------------------------------------------------


class HelperProcess:
    """A helper started with ``args``, announcing itself with ``tag``."""

    def __init__(self, args: Sequence[str], tag: str, env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.tag = tag
        # A file, not a pipe, so a chatty helper can never block on a full stderr pipe.
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the helper; close()
        self.popen = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      bufsize=0, cwd=REPO, env=env)
        # Lines are cut here from raw reads: a buffered reader would hide lines it read ahead from select().
        self._pending = b""
        self._announcement: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        """`ip netns exec` and setpriv exec the command, so this is the helper's own pid."""
        return self.popen.pid

    @property
    def name(self) -> str:
        return " ".join(self.args)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()

    def _failed(self, what: str) -> HelperFailed:
        return HelperFailed(f"{self.name}: {what} (exit status {self.popen.poll()}); stderr: {self.stderr()}")

    def _readline(self, timeout: float) -> str | None:
        """The next line, or None when none came within ``timeout`` s; fails when the helper exited."""
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if not select.select([fd], [], [], max(remaining, 0.0))[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                self.popen.wait(timeout=STOP_GRACE)
                raise self._failed("exited")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.decode()

    def _parse(self, word: str, line: str) -> dict[str, Any]:
        said, _, payload = line.partition(" ")
        fields: dict[str, Any] = json.loads(payload) if payload.strip() else {}
        if said == ERROR and word != ERROR:
            raise self._failed(f"failed: {fields.get('error', line)}")
        if said != word:
            raise self._failed(f"expected {word}, got {line!r}")
        return fields

    def expect(self, word: str, timeout: float) -> dict[str, Any]:
        """The fields of the next line, which must be ``word``."""
        line = self._readline(timeout)
        if line is None:
            raise self._failed(f"no {word} within {timeout:g} s")
        return self._parse(word, line)

    def poll(self, word: str) -> dict[str, Any] | None:
        """The fields of the next line if it has arrived (it must be ``word``), else None; does not wait."""
        line = self._readline(0.0)
        return None if line is None else self._parse(word, line)

    def ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """The helper's announcement (pid, listeners, ...), waited for on first use."""
        if self._announcement is None:
            self._announcement = self.expect(self.tag, timeout)
        return self._announcement

    def send(self, command: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(command.encode() + b"\n")

    def request(self, command: str, timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
        """Send one command and wait for its OK; fails with the helper's error otherwise."""
        self.ready()
        self.send(command)
        try:
            return self.expect(OK, timeout)
        except HelperFailed as exc:
            raise HelperFailed(f"{command!r}: {exc}") from None

    def close_stdin(self) -> None:
        """The cue to exit, without waiting: several helpers told at once then exit side by side."""
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            with contextlib.suppress(BrokenPipeError):  # it already exited
                self.popen.stdin.close()

    def stop(self, timeout: float = STOP_GRACE) -> int:
        """Close stdin, which ends the helper; SIGTERM, then SIGKILL, if it does not go (a load loop in the
        middle of a round reads stdin only now and then)."""
        return stop_process(self.popen, ask=(signal.SIGTERM,), grace=timeout)

    def close(self) -> None:
        self.stop()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._stderr.close()


def stop_all(helpers: Sequence[HelperProcess]) -> None:
    """Tell every helper at once, then wait for each: they exit side by side, not one after another."""
    for helper in helpers:
        helper.close_stdin()
    for helper in reversed(helpers):
        helper.close()


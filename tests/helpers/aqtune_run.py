"""aqtune as an operator runs it, from the work tree: one-shot commands (status, rollback, check) and
`aqtune run` in the background, for the tests and the benchmarks.

The daemon's log (key=value lines on stderr) goes to a file that the tests read back while it runs,
so they can wait for a log line instead of sleeping for a fixed time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aqtune.act.ledger import FORMAT_VERSION
from tests.helpers.process import PYTHON, REPO, as_user, kill_process, stop_process

COMMAND_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0  # for the daemon to finish the sweep under way and exit after SIGTERM


def aqtune_command(*args: str, user: str | None = None) -> list[str]:
    """The command line of ``aqtune ARGS`` from the work tree, run as ``user`` (setpriv) if given."""
    return as_user(user, [PYTHON, "-m", "aqtune", *args])


def aqtune(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """One aqtune command run to completion (status, rollback, check), from the work tree."""
    return subprocess.run(aqtune_command(*args, user=user), capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                          cwd=REPO, stdin=subprocess.DEVNULL)


def write_policy(path: Path, text: str, mode: int = 0o644, uid: int = 0) -> Path:
    """A policy file with the given permissions: apply mode is honoured only for root-owned, 0644-like files.

    Without a [metrics] table the daemon would write the host's node_exporter textfile directory.
    """
    if "[metrics]" not in text:
        text += '\n[metrics]\ntextfile = ""\n'
    path.write_text(text, encoding="utf-8")
    os.chown(path, uid, -1)
    os.chmod(path, mode)  # after chown, which may clear mode bits, and regardless of the umask
    return path


def ledger_changes(state_dir: Path) -> list[dict[str, Any]] | None:
    """The entries of DIR/changes.json, or None when aqtune never wrote one."""
    try:
        document = json.loads((state_dir / "changes.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    assert document["version"] == FORMAT_VERSION, document
    changes: list[dict[str, Any]] = document["changes"]
    return changes


class Daemon:
    """``[PREFIX...] aqtune run ARGS`` in the background, its stdout and stderr in ``log_path``; ``env``, when
    given, is its whole environment. Every wrapper in ``prefix`` must exec the command, so that the pid is the
    daemon's own and SIGTERM and SIGHUP reach it."""

    def __init__(self, args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
                 prefix: Sequence[str] = ()) -> None:
        self.args = [*prefix, *aqtune_command("run", *args)]
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=REPO, env=env)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def lines(self) -> list[str]:
        return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()

    def matching(self, *needles: str) -> list[int]:
        """Indexes of the log lines containing every needle."""
        return [index for index, line in enumerate(self.lines()) if all(needle in line for needle in needles)]

    def count(self, *needles: str) -> int:
        return len(self.matching(*needles))

    def wait_for(self, *needles: str, after: int = -1, timeout: float = 15.0) -> int:
        """Index of the first log line after line ``after`` containing every needle; fails early if the daemon
        exits, and with the whole log otherwise, so a failure shows what aqtune did instead."""
        deadline = time.monotonic() + timeout
        while True:
            found = [index for index in self.matching(*needles) if index > after]
            if found:
                return found[0]
            exited = self.popen.poll()
            if exited is not None or time.monotonic() >= deadline:
                state = f"aqtune exited {exited}" if exited is not None else f"timed out after {timeout} s"
                log = "\n".join(self.lines())
                raise AssertionError(f"{state} before logging a line with {needles!r}; log:\n{log}")
            time.sleep(0.05)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, as systemd stops it, and SIGKILL after ``timeout``; the exit status. The sweep under way
        finishes first."""
        return stop_process(self.popen, ask=(signal.SIGTERM,), grace=timeout)

    def kill(self) -> None:
        """SIGKILL and reap; safe to call more than once and after it exited."""
        kill_process(self.popen)


def logged(key: str, value: str) -> str:
    """``key=value`` as the daemon's console log writes it. The renderer's quoting differs between
    structlog versions (25 writes ``subject='netns web'``, 22.3 wrote ``subject=netns web``), so
    the renderer itself is asked, with the settings aqtune's console output uses."""
    import structlog

    line: str = structlog.dev.ConsoleRenderer(colors=False, sort_keys=False)(None, "info", {"event": "", key: value})
    return line[line.index(f"{key}="):].rstrip()

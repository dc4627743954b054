"""A real, private systemd-journald for one test, and reading its entries back with journalctl.

journald runs in a mount namespace of its own (``unshare --mount``) where /run is a fresh tmpfs with
the test's directories bound onto /run/systemd and /run/log, and its config is the test's: nothing on
the host is touched, several can run at once, and no systemd as PID 1 is needed. Its native socket,
DIR/run-systemd/journal/socket, is reachable from the host's mount namespace, so the code under test
does not have to run in there: aqtune is pointed at it with AQTUNE_JOURNAL_SOCKET. Entries are read
back from DIR/run-log/journal with ``journalctl -D``, which needs no namespace either.

journald also gets a network namespace of its own, where net.unix.max_dgram_qlen is what systemd sets it
to at boot (512), not the kernel's default (10) that this machine keeps without systemd as PID 1. The
queue belongs to the receiving socket, so that is what senders meet, as on a real host; with 10, a burst
of entries blocks the sender whenever journald is slow to be scheduled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers.process import stop_process

JOURNALD = "/lib/systemd/systemd-journald"
JOURNALCTL = "/usr/bin/journalctl"
START_TIMEOUT = 10.0
QUERY_TIMEOUT = 20.0
SYSTEMD_DGRAM_QLEN = 512  # systemd's bump_unix_max_dgram_qlen() at boot
MAX_SUN_PATH = 107  # sockaddr_un.sun_path, less the terminating NUL

# Volatile storage in the bound /run/log; no kmsg, no forwarding; no rate limit, which would drop a
# flood test's entries for reasons that are journald's, not aqtune's.
CONFIG = """\
[Journal]
Storage=volatile
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitBurst=0
RuntimeMaxUse=32M
"""

# Run inside the new mount namespace. The tmpfs over /run means no directory has to be created on the
# host for the bind targets, and journald sees nothing of the host's /run.
NAMESPACE_SCRIPT = """\
set -e
if [ -n "$2" ]; then echo "$2" > /proc/sys/net/unix/max_dgram_qlen; fi
mount -t tmpfs -o mode=0755 aqt-journald /run
mkdir -p /run/systemd /run/log
mount --bind "$1/run-systemd" /run/systemd
mount --bind "$1/run-log" /run/log
mount --bind "$1/journald.conf" /etc/systemd/journald.conf
exec {journald}
"""


def available() -> str | None:
    """Why the journald tests cannot run here, or None."""
    for tool in (JOURNALD, "/usr/bin/unshare", JOURNALCTL):
        if not os.access(tool, os.X_OK):
            return f"{tool} not found (Debian packages systemd, util-linux)"
    return None


class Journald:
    """systemd-journald in its own mount namespace, everything under ``directory``."""

    def __init__(self, directory: Path, max_dgram_qlen: int | None = SYSTEMD_DGRAM_QLEN) -> None:
        """``max_dgram_qlen`` None keeps journald in the host's network namespace, with its queue length."""
        self.directory = directory
        if len(self.socket.encode()) > MAX_SUN_PATH:
            raise AssertionError(f"{self.socket}: too long for an AF_UNIX address; use a shorter directory")
        (directory / "run-systemd").mkdir(parents=True)
        (directory / "run-log").mkdir()
        (directory / "journald.conf").write_text(CONFIG, encoding="utf-8")
        self.log_path = directory / "journald.log"
        script = NAMESPACE_SCRIPT.format(journald=JOURNALD)
        with open(self.log_path, "wb") as log:
            # unshare without --fork execs bash, which execs journald: the Popen pid is journald's.
            # A clean environment: a NOTIFY_SOCKET or WATCHDOG_USEC meant for the test must not reach it.
            self.popen = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", *(["--net"] if max_dgram_qlen else []),
                 "bash", "-c", script, "bash", str(directory), str(max_dgram_qlen or "")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
        try:
            self._wait_started()
        except BaseException:
            self.stop()
            raise

    @property
    def socket(self) -> str:
        """The native protocol socket, for AQTUNE_JOURNAL_SOCKET."""
        return str(self.directory / "run-systemd" / "journal" / "socket")

    @property
    def storage(self) -> Path:
        return self.directory / "run-log" / "journal"

    def _wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.socket):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"systemd-journald did not come up (exit {self.popen.poll()}): "
                                     f"{self.log_path.read_text(errors='replace')}")
            time.sleep(0.02)

    def entries(self, *matches: str) -> list[dict[str, Any]]:
        """Every entry so far (``FIELD=value`` matches as journalctl takes them), oldest first."""
        if not self.storage.exists():
            return []
        done = subprocess.run([JOURNALCTL, "--no-pager", "-q", "-D", str(self.storage), "-o", "json", "--all",
                               *matches], capture_output=True, text=True, timeout=QUERY_TIMEOUT,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise AssertionError(f"journalctl -D {self.storage} failed: {done.stderr.strip()}")
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def wait_for(self, *matches: str, where: Callable[[dict[str, Any]], bool] | None = None,
                 count: int = 1, timeout: float = 15.0, alive: Callable[[], str | None] | None = None,
                 ) -> list[dict[str, Any]]:
        """Poll until ``count`` entries match (and satisfy ``where``); fails with every entry seen.

        ``alive`` returns why waiting is pointless (the sender exited), to fail early.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.entries(*matches) if where is None or where(e)]
            if len(found) >= count:
                return found
            gone = alive() if alive is not None else None
            if gone or time.monotonic() > deadline:
                seen = "\n".join(f"{e.get('PRIORITY')} {e.get('MESSAGE_ID', '-')} {e.get('MESSAGE')}"
                                 for e in self.entries())
                state = gone or f"timed out after {timeout} s"
                raise AssertionError(f"{state} waiting for {count} entries {matches!r}; the journal has:\n{seen}")
            time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.popen, ask=(signal.SIGTERM,))


@contextlib.contextmanager
def private_journald(directory: Path, max_dgram_qlen: int | None = SYSTEMD_DGRAM_QLEN) -> Any:
    journald = Journald(directory, max_dgram_qlen)
    try:
        yield journald
    finally:
        journald.stop()
        shutil.rmtree(directory, ignore_errors=True)

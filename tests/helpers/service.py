"""`aqtune run` started the way a service manager starts it, for the daemon tests.

tests/helpers/aqtune_run.Daemon runs ``aqtune run ARGS`` with the test's environment; the daemon tests
also need the environment systemd gives a service (NOTIFY_SOCKET, WATCHDOG_USEC, the journal socket)
and a wrapper in front (``unshare -m`` to break the filesystem under it, tests/helpers/netlink_gate.py
to break netlink). Everything else (the log file, wait_for, stop, kill) is Daemon's.

Also node_exporter, which serves aqtune's textfile metrics for a real scrape.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.helpers.aqtune_run import Daemon
from tests.helpers.process import stop_process

# Variables of the test process that would change how the daemon logs or notifies.
SERVICE_VARIABLES = ("AQTUNE_LOG", "AQTUNE_JOURNAL_SOCKET", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"


def unshare_mount(script: str) -> list[str]:
    """A prefix running ``script`` (sh) in a private mount namespace, then exec'ing the command after it."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script + '\nexec "$@"', "sh"]


def service_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean copy of this process's environment with ``env`` added: what the service manager would pass."""
    environment = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    environment.update(env or {})
    return environment


class ServiceDaemon(Daemon):
    """``[PREFIX...] python -m aqtune run ARGS`` with ``env`` added to a clean copy of the test's environment."""

    def __init__(self, args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
                 prefix: Sequence[str] = ()) -> None:
        self.started_at = time.monotonic()
        super().__init__(args, log_path, env=service_environment(env), prefix=prefix)

    def alive(self) -> str | None:
        """Why the daemon is no longer worth waiting for, or None (for Journald.wait_for)."""
        code = self.popen.poll()
        return None if code is None else f"aqtune exited {code}; log:\n" + "\n".join(self.lines())


def read_state(state_dir: Path) -> dict[str, Any] | None:
    try:
        document: dict[str, Any] = json.loads((state_dir / "status.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return document


def wait_for_state(state_dir: Path, daemon: Daemon, after: float = 0.0, timeout: float = 15.0,
                   what: str = "a state document") -> dict[str, Any]:
    """The first state document taken after ``after`` (time.time()); fails if the daemon exits."""
    deadline = time.monotonic() + timeout
    while True:
        document = read_state(state_dir)
        if document is not None and document["taken_at"] > after:
            return document
        code = daemon.popen.poll()
        if code is not None or time.monotonic() > deadline:
            state = f"aqtune exited {code}" if code is not None else f"timed out after {timeout} s"
            raise AssertionError(f"{state} waiting for {what} in {state_dir}; log:\n" + "\n".join(daemon.lines()))
        time.sleep(0.02)


def free_port() -> int:
    """A loopback port nobody listens on now (node_exporter binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class NodeExporter:
    """prometheus-node-exporter with only the textfile collector, on a loopback port."""

    def __init__(self, directory: Path, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [NODE_EXPORTER, "--collector.disable-defaults", "--collector.textfile",
                 f"--collector.textfile.directory={directory}", f"--web.listen-address=127.0.0.1:{self.port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.scrape()
                return
            except OSError as exc:
                if self.popen.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"node_exporter did not serve ({exc}): "
                                         f"{log_path.read_text(errors='replace')}") from None
                time.sleep(0.05)

    def scrape(self) -> str:
        # No proxy: a proxy from the environment must not stand between the test and loopback.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            text: str = response.read().decode()
            return text

    def stop(self) -> None:
        stop_process(self.popen, ask=(signal.SIGTERM,))

"""Finding 1 under the real systemd, with the packaged unit: a socket name must not steer PID 1.

An unprivileged user (a transient unit running as nobody) binds a Unix socket named
``@x\\nWATCHDOG_USEC=1\\nX`` with listen(1) and two queued connects, so that it is the worst listener
and its name goes into aqtune's STATUS= line. sd_notify splits assignments at newlines: before aqtune
sent its own notifications, systemd read a 1 us watchdog from that line and killed aqtune over and
over ("Watchdog timeout (limit 1us)", a restart every ~2.5 s). Here the daemon must stay up with its
30 s watchdog and show the name escaped; and a name above U+00FF (which the sdnotify package could not
encode, silently ending every status update) must still update the status.

Runs after test_package.py (file order) on the same container; installs the package itself when that
file did not run or purged it, and leaves no unit of its own behind.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Iterator

import pytest

from tests.system.conftest import NOTES, Package
from tests.system.machine import Container
from tests.system.test_package import UNIT, journal, show, status_json, wait_for, wait_running

pytestmark = pytest.mark.system

WATCHDOG_NAME = "@x\nWATCHDOG_USEC=1\nX"
WIDE_NAME = "@名前-\U0001f600"
SCRIPT = "/run/aqtest-hostile.py"
HOSTILE_UNIT = "aqtest-hostile.service"
OBSERVE = 12.0  # seconds the daemon must stay up with the hostile name in its status; it died within 3
# Binds the abstract name in argv[1] (a Python string literal, so that no newline passes through
# systemd-run), fills the queue of its listen(1) with two clients, and holds them.
HOSTILE = textwrap.dedent("""
    import ast, socket, sys, time
    name = ast.literal_eval(sys.argv[1])
    address = b"\\0" + name[1:].encode()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(address)
    server.listen(1)
    clients = []
    for _ in range(2):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        client.connect(address)
        clients.append(client)
    time.sleep(300)
""")


def escaped(name: str) -> str:
    """The name as aqtune shows it (aqtune.text.cescape), for the names used here."""
    return name.replace("\n", "\\n")


@pytest.fixture
def installed(machine: Container, package: Package) -> Iterator[dict[str, str]]:
    status = machine.run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "aqtune", check=False).stdout.strip()
    if status != "ii":
        machine.run("apt-get", "install", "-y", f"/mnt/debs/{package.deb.name}", timeout=300)
    machine.write(SCRIPT, HOSTILE)
    props = wait_running(machine)
    try:
        yield props
    finally:
        machine.run("systemctl", "stop", HOSTILE_UNIT, check=False)
        machine.run("systemctl", "reset-failed", HOSTILE_UNIT, check=False)
        machine.run("rm", "-f", SCRIPT)


def hostile_listener(machine: Container, name: str) -> None:
    machine.run("systemctl", "stop", HOSTILE_UNIT, check=False)
    machine.run("systemctl", "reset-failed", HOSTILE_UNIT, check=False)
    machine.run("systemd-run", f"--unit={HOSTILE_UNIT}", "--property=User=nobody", "--property=Type=exec",
                "python3", SCRIPT, repr(name))


def status_with(machine: Container, text: str, timeout: float = 30.0) -> str:
    """The unit's status line once it contains ``text``; on time-out, what it said and the hostile unit's state."""
    deadline = time.monotonic() + timeout
    while True:
        status = show(machine, "StatusText")["StatusText"]
        if text in status:
            return status
        if time.monotonic() > deadline:
            hostile = machine.run("systemctl", "status", "--no-pager", HOSTILE_UNIT, check=False).stdout
            pytest.fail(f"no {text!r} in the status line after {timeout:.0f} s: {status!r}\n{hostile}")
        time.sleep(0.5)


def test_a_socket_name_cannot_set_the_watchdog(machine: Container, installed: dict[str, str]) -> None:
    before = show(machine, "MainPID", "NRestarts", "WatchdogUSec")
    assert before["WatchdogUSec"] == "30s", before
    since = machine.run("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()
    hostile_listener(machine, WATCHDOG_NAME)
    wait_for("aqtune to see the hostile listener",
             lambda: any(l["address"] == WATCHDOG_NAME for l in status_json(machine)["listeners"]))
    # Before the fix systemd read WatchdogUSec=1us from the next STATUS= and killed aqtune within a
    # second, then again after every restart.
    started = time.monotonic()
    while time.monotonic() - started < OBSERVE:
        now = show(machine, "ActiveState", "MainPID", "NRestarts", "WatchdogUSec", "StatusText")
        assert (now["WatchdogUSec"], now["ActiveState"], now["MainPID"], now["NRestarts"]) == \
            ("30s", "active", before["MainPID"], before["NRestarts"]), now
        time.sleep(1)
    messages = [str(e.get("MESSAGE")) for e in journal(machine, f"--since={since}")]
    assert not [m for m in messages if "Watchdog timeout" in m or "result 'watchdog'" in m], messages[-20:]
    status = status_with(machine, f"({escaped(WATCHDOG_NAME)})")
    NOTES["status line with the hostile name"] = status
    assert "worst fill 2.00" in status
    shown = machine.run("systemctl", "status", "--no-pager", "--lines=0", UNIT, check=False).stdout
    status_lines = [line.strip() for line in shown.splitlines() if line.strip().startswith("Status:")]
    assert len(status_lines) == 1 and escaped(WATCHDOG_NAME) in status_lines[0], shown


def test_a_name_above_latin1_still_updates_the_status(machine: Container, installed: dict[str, str]) -> None:
    hostile_listener(machine, WIDE_NAME)
    status = status_with(machine, f"({WIDE_NAME})")
    NOTES["status line with a name above U+00FF"] = status
    # And it goes on updating: the listener gone, the status moves on.
    machine.run("systemctl", "stop", HOSTILE_UNIT)
    wait_for("the status line without the wide name",
             lambda: WIDE_NAME not in show(machine, "StatusText")["StatusText"], timeout=30)
    assert show(machine, "NRestarts")["NRestarts"] == installed["NRestarts"]

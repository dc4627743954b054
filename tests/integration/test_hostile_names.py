"""Names an unprivileged user chose to attack whoever reads aqtune: on the real kernel, as `nobody`.

The attacker (tests/helpers/hostile.py under setpriv) binds Unix sockets whose names carry a newline
and an sd_notify assignment, terminal escape sequences (OSC title, CSI erase), BEL, bidi overrides,
NUL bytes and characters above U+00FF, one at a relative path that reads as a TCP address, under a
process name with an escape sequence; in a user namespace of its own it also renames its loopback
interface. aqtune must show every name escaped, keep the JSON valid, never crash on the output's
encoding, and send systemd a STATUS line no name can split.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aqtune.text import cescape
from tests.helpers.aqtune_run import write_policy
from tests.helpers.namespace import HELPERS, PYTHON, REPO, HelperProcess, TestNamespace, user_group, wait_until
from tests.helpers.notify import NotifyListener
from tests.helpers.service import ServiceDaemon
from tests.helpers.systemd_split import split_like_systemd

pytestmark = pytest.mark.integration

ATTACKER = "nobody"
WATCHDOG_NAME = "@x\nWATCHDOG_USEC=1\nX"  # finding 1: systemd set a 1 us watchdog from this STATUS=
OSC_TITLE = "@t\x1b]0;owned\x07"
CSI_ERASE = "@e\x1b[2K\x1b[1A\r"
BIDI = "@b\x07\u202eexe.txt\u2066"
NUL_INSIDE = "@nul\0inside\0"
WIDE = "@名前-\U0001f600"
RELATIVE = "0.0.0.0:443"  # a Unix socket bound at this relative path, not a TCP listener
COMM = "c\x1b]0;t\x07\x1b[2K"
LO_NAME = b"e\x1b[0m\xe2\x80\xae\xff"  # ESC, a bidi override and a byte that is not UTF-8
HOSTILE_UNIX = (WATCHDOG_NAME, OSC_TITLE, CSI_ERASE, BIDI, NUL_INSIDE, WIDE, RELATIVE)
# How aqtune's address field holds them: NULs of an abstract name as '@' (as ss), ./ before a relative path.
ADDRESS = {name: name.replace("\0", "@") for name in HOSTILE_UNIX} | {RELATIVE: "./" + RELATIVE}
COMMAND_TIMEOUT = 60.0
WATCH_SECONDS = 3.0
WATCHDOG_USEC = 2_000_000
START_TIMEOUT = 60.0


def as_attacker(*command: str) -> list[str]:
    return ["setpriv", f"--reuid={ATTACKER}", f"--regid={user_group(ATTACKER)}", "--clear-groups", *command]


def attacker_spec(**spec: Any) -> str:
    return json.dumps({"comm": COMM, "life": 120, **spec})  # ASCII: ESC and NUL as JSON escapes


def aqtune(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """aqtune as bytes: what reaches the terminal, before any decoding could hide a control byte."""
    return subprocess.run([PYTHON, "-m", "aqtune", *args], capture_output=True, timeout=COMMAND_TIMEOUT,
                          cwd=REPO, stdin=subprocess.DEVNULL, env=env)


def terminal_controls(output: str) -> list[str]:
    """Characters a terminal would act on, other than the line breaks between lines."""
    return sorted({char for char in output.replace("\n", "") if not char.isprintable()})


@dataclass
class Attack:
    ns: TestNamespace
    helper: HelperProcess
    listeners: list[dict[str, Any]]


@pytest.fixture(scope="module")
def attack() -> Iterator[Attack]:
    """The attacker's listeners in a namespace of the test's own; the watchdog name full (2/1)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run the attacker as nobody")
    ns = TestNamespace(f"aqt-{os.getpid()}-hostile")
    cwd = Path(tempfile.mkdtemp(prefix="aqt-hostile-"))
    try:
        os.chown(cwd, int(subprocess.check_output(["id", "-u", ATTACKER])), -1)
        unix = [{"name": name, "backlog": 1, "connects": 2 if name == WATCHDOG_NAME else 0} for name in HOSTILE_UNIX]
        helper = HelperProcess(ns.exec_args(*as_attacker(PYTHON, str(HELPERS / "hostile.py"),
                                                         attacker_spec(cwd=str(cwd), unix=unix))), "READY")
        ns.helpers.append(helper)
        yield Attack(ns, helper, helper.ready()["listeners"])
    finally:
        ns.destroy()
        shutil.rmtree(cwd, ignore_errors=True)


def status_document(*args: str) -> dict[str, Any]:
    done = aqtune("status", "--json", "--sweep", *args)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.isascii()
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def test_json_is_valid_ascii_and_keeps_every_name(attack: Attack) -> None:
    document = status_document("--netns", attack.ns.name)
    by_cookie = {listener["cookie"]: listener for listener in document["listeners"]}
    for announced in attack.listeners:
        listener = by_cookie[announced["cookie"]]
        assert listener["address"] == ADDRESS[announced["address"]]
        assert listener["proto"] == "unix" and listener["uid"] != 0
        assert listener["processes"][0]["comm"] == COMM
    worst = document["listeners"][0]
    assert (worst["address"], worst["queue"], worst["backlog"]) == (WATCHDOG_NAME, 2, 1)


def test_status_table_shows_every_name_escaped(attack: Attack) -> None:
    done = aqtune("status", "--sweep", "--netns", attack.ns.name)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    table = done.stdout.decode("utf-8")  # strict: what a UTF-8 terminal receives
    assert terminal_controls(table) == []
    rows = [line for line in table.splitlines() if line.startswith(attack.ns.name + " ")]
    assert len(rows) == len(HOSTILE_UNIX), table
    assert rows[0].split()[2:4] == [cescape(WATCHDOG_NAME), "2/1"]
    for name in HOSTILE_UNIX:
        assert cescape(ADDRESS[name]) in table, name
    assert "./0.0.0.0:443" in table and " 0.0.0.0:443 " not in table
    assert f"/{cescape(COMM)}" in table


def test_watch_repaints_without_a_hostile_control_character(attack: Attack) -> None:
    popen = subprocess.Popen([PYTHON, "-m", "aqtune", "status", "--sweep", "--watch", "--interval", "0.5",
                              "--netns", attack.ns.name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=REPO, stdin=subprocess.DEVNULL)
    try:
        time.sleep(WATCH_SECONDS)
    finally:
        popen.terminate()
        out, err = popen.communicate(timeout=COMMAND_TIMEOUT)
    screen = out.decode("utf-8")
    frames = screen.split("\x1b[H\x1b[J")  # aqtune's own repaint, the only escape it may write
    assert len(frames) >= 3, (screen[-2000:], err)  # "" before the first, then at least two refreshes
    for frame in frames:
        assert terminal_controls(frame) == []
    assert "(+0)" in frames[-1] or "(+" not in frames[-1]


@pytest.mark.parametrize("env", [
    {"PYTHONIOENCODING": "latin-1"},
    {"PYTHONIOENCODING": "ascii"},
    {"LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"},  # an ASCII locale
], ids=["latin-1", "ascii", "C-locale"])
def test_status_on_a_stdout_that_is_not_utf8(attack: Attack, env: dict[str, str]) -> None:
    done = aqtune("status", "--sweep", "--netns", attack.ns.name, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"Traceback" not in done.stderr
    text = done.stdout.decode("latin-1")
    assert terminal_controls(text) == []
    # What the encoding cannot write is a backslash escape: 名 is U+540D.
    assert "@\\u540d\\u524d-\\U0001f600" in text
    assert cescape(WATCHDOG_NAME) in text


@pytest.fixture
def user_namespace_listener() -> Iterator[tuple[HelperProcess, int]]:
    """The attacker in a user and network namespace of its own, its loopback renamed to LO_NAME and a
    TCP listener bound to it; (helper, namespace inode)."""
    if shutil.which("setpriv") is None or shutil.which("unshare") is None:
        pytest.skip("setpriv and unshare (util-linux) are needed to run the attacker in a user namespace")
    helper = HelperProcess(as_attacker("unshare", "-rn", PYTHON, str(HELPERS / "hostile.py"),
                                       attacker_spec(lo=LO_NAME.hex(), tcp=[{"backlog": 4, "device": True}])),
                           "READY")
    try:
        try:
            pid = helper.ready()["pid"]
        except AssertionError as exc:
            if "Operation not permitted" in str(exc) or "unshare failed" in str(exc):
                pytest.skip(f"unprivileged user namespaces are not allowed here: {exc}")
            raise
        yield helper, os.stat(f"/proc/{pid}/ns/net").st_ino
    finally:
        helper.close()


def test_interface_name_from_a_user_namespace_is_escaped(
        user_namespace_listener: tuple[HelperProcess, int]) -> None:
    helper, inode = user_namespace_listener
    (announced,) = helper.ready()["listeners"]
    port = announced["address"].rsplit(":", 1)[1]
    document = status_document("--netns", str(inode))
    (listener,) = [l for l in document["listeners"] if l["cookie"] == announced["cookie"]]
    # Valid text whatever the bytes: the one that is not UTF-8 shows as \xff, as in a Unix path.
    assert listener["address"] == f"127.0.0.1%e\x1b[0m\u202e\\xff:{port}"
    done = aqtune("status", "--sweep", "--netns", str(inode))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    table = done.stdout.decode("utf-8")
    assert terminal_controls(table) == []
    assert f"127.0.0.1%e\\x1b[0m\\u202e\\\\xff:{port}" in table


# --- sd_notify: the daemon's STATUS= line under a hostile worst listener ------------------------------------


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., ServiceDaemon]]:
    started: list[ServiceDaemon] = []

    def start(args: list[str], env: dict[str, str]) -> ServiceDaemon:
        daemon = ServiceDaemon(args, tmp_path / f"daemon-{len(started)}.log", env=env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def notified_status(netns: Callable[[], TestNamespace], daemons: Callable[..., ServiceDaemon], tmp_path: Path,
                    name: str) -> list[list[str]]:
    """`aqtune run` over a namespace whose worst listener is ``name`` (2/1); every notification's
    assignments, as systemd splits them, once three STATUS= lines have arrived."""
    ns = netns()
    unix = [{"name": name, "backlog": 1, "connects": 2}]
    ns.helpers.append(helper := HelperProcess(ns.exec_args(*as_attacker(
        PYTHON, str(HELPERS / "hostile.py"), attacker_spec(unix=unix))), "READY"))
    helper.ready()
    policy = write_policy(tmp_path / "policy.toml", 'mode = "recommend"\ninterval = 0.5\n')
    notify = NotifyListener(tmp_path / "notify")
    try:
        daemon = daemons(["--config", str(policy), "--netns", ns.name, "--state-dir", str(tmp_path / "state"),
                          "--dry-run", "--no-ebpf"],
                         {"AQTUNE_LOG": "console", "NOTIFY_SOCKET": str(notify.path),
                          "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        wait_until(lambda: len(notify.with_key("STATUS")) >= 3 or daemon.alive(), "three STATUS= lines",
                   timeout=START_TIMEOUT)
        assert daemon.alive() is None, daemon.alive()
        assert daemon.stop() == 0
    finally:
        notify.close()
    messages = [split_like_systemd("\n".join(message.lines)) for message in notify.received()]
    assert None not in messages, "systemd would drop a notification"
    return [message for message in messages if message is not None]


def test_a_socket_name_cannot_set_the_watchdog(netns: Callable[[], TestNamespace],
                                               daemons: Callable[..., ServiceDaemon], tmp_path: Path) -> None:
    messages = notified_status(netns, daemons, tmp_path, WATCHDOG_NAME)
    lines = [line for message in messages for line in message]
    assert any("READY=1" in message for message in messages)
    assert not [line for line in lines if not re.match(r"(READY|STATUS|WATCHDOG|STOPPING)=", line)], lines
    statuses = [line for line in lines if line.startswith("STATUS=")]
    assert len(statuses) >= 3
    assert all(cescape(WATCHDOG_NAME) in line for line in statuses[1:]), statuses


def test_a_name_above_latin1_still_updates_the_status(netns: Callable[[], TestNamespace],
                                                      daemons: Callable[..., ServiceDaemon], tmp_path: Path) -> None:
    messages = notified_status(netns, daemons, tmp_path, WIDE)
    statuses = [line for message in messages for line in message if line.startswith("STATUS=")]
    assert len(statuses) >= 3
    assert all(WIDE in line for line in statuses[1:]), statuses

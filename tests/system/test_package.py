"""The Debian package on a real systemd: build, lintian, install, run, reload, watchdog, upgrade, purge.

Host-side tests look at the .deb and its unit without installing anything on the host. The
container tests run in file order on one booted container per Debian release, bookworm then trixie
(see conftest.py): each step starts from the state the previous one left, as an administrator's
session would.
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from tests.system.conftest import (
    NOTES,
    OLD_LAYOUT_VERSION_SUFFIX,
    OLD_UNIT_PATH,
    UNIT_PATH,
    UPGRADE_POLICY_LINE,
    UPGRADE_VERSION_SUFFIX,
    Package,
)
from tests.system.machine import Container, Release, clean_env

pytestmark = pytest.mark.system

T = TypeVar("T")

UNIT = "aqtune.service"
UNIT_FILE = "/" + UNIT_PATH
POLICY = "/etc/aqtune/policy.toml"
MAX_EXPOSURE = 3.0  # the daemon issue's target for `systemd-analyze security`
ALLOWED_LINTIAN_WARNINGS = {"initial-upload-closes-no-bugs"}
MESSAGE_IDS = {  # aqtune/act/log.py, as the journal catalog documents them
    "drops": "d146ae63c10b45aab745fa44f5ab820e",
    "degraded": "2e83ae8f7ce24a85b9ace2fd5f3a16fb",
    "lifecycle": "2128cf4097d44eeb821982ac5ff362bb",
}
STATUS_TEXT = re.compile(r"^watching \d+ listeners in \d+ netns; .*; \d+ drops in the last minute; "
                         r"mode (recommend|apply|dry-run); eBPF \S+$")
LISTENER_PORT = 8765
LISTENER_UNIT = "aqtest-listener.service"
# Listens with backlog 1 and never accepts: the accept queue is full after two handshakes.
LISTENER = textwrap.dedent(f"""
    import socket, time
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", {LISTENER_PORT}))
    s.listen(1)
    time.sleep(600)
""")
# Bounded: 32 connection attempts held for 3.5 s (the SYNs and their retransmissions at 1 s and 3 s),
# then closed.
FLOOD = textwrap.dedent(f"""
    import socket, time
    clients = []
    for _ in range(32):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", {LISTENER_PORT}))
        clients.append(c)
    time.sleep(3.5)
    for c in clients:
        c.close()
""")
PACKAGE_PATHS = (
    "/usr/bin/aqtune",
    UNIT_FILE,
    "/etc/aqtune/policy.toml",
    "/usr/lib/systemd/catalog/aqtune.catalog",
    "/usr/share/man/man8/aqtune.8.gz",
    "/usr/share/man/man5/aqtune.toml.5.gz",
    "/usr/share/bash-completion/completions/aqtune",
    "/usr/share/aqtune/bpf/aqtune.c",
    "/usr/lib/python3/dist-packages/aqtune/cli.py",
)


# A probe's state in `aqtune status --json`: how it attached, or why it did not.
PROBE_STATE = re.compile(r"^(attached \(.+\)|not attached: .+)$")
LINTIAN_COMMAND = ("lintian", "--pedantic", "--display-info", "--tag-display-limit", "0")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0, every: float = 0.5) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def show(machine: Container, *properties: str) -> dict[str, str]:
    out = machine.run("systemctl", "show", UNIT, *(f"--property={p}" for p in properties)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(machine: Container, *matches: str) -> list[dict[str, Any]]:
    out = machine.run("journalctl", f"--unit={UNIT}", "--output=json", "--no-pager", *matches).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def running(machine: Container) -> dict[str, str] | None:
    """The unit's properties once it is active with its status line, else None."""
    props = show(machine, "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
    if props["ActiveState"] == "active" and STATUS_TEXT.match(props["StatusText"]):
        return props
    return None


def wait_running(machine: Container, timeout: float = 60.0) -> dict[str, str]:
    return wait_for(f"{UNIT} active with its status line", lambda: running(machine), timeout)


def status_json(machine: Container) -> dict[str, Any]:
    result = machine.run("aqtune", "status", "--json")
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def daemon_state(machine: Container) -> dict[str, Any]:
    """The running daemon's own record of itself. Read from its state file because `aqtune status`
    also loads the policy, and exits 2 while the file on disk is broken."""
    state: dict[str, Any] = json.loads(machine.read("/var/lib/aqtune/status.json"))["daemon"]
    return state


def exposure(output: str) -> float:
    match = re.search(r"Overall exposure level for aqtune\.service: (\d+\.\d+)", output)
    assert match, f"no exposure level in:\n{output}"
    return float(match.group(1))


def lintian_problems(lines: list[str]) -> list[str]:
    """Errors, and warnings other than the allowed ones, in lintian's output."""
    return [line for line in lines
            if line.startswith("E:") or (line.startswith("W:") and line.split()[2] not in ALLOWED_LINTIAN_WARNINGS)]


def assert_purged(machine: Container) -> None:
    """Nothing of the package is left: no dpkg record, unit, files, state or process."""
    assert machine.run("dpkg-query", "-W", "aqtune", check=False).returncode != 0
    assert show(machine, "LoadState")["LoadState"] == "not-found"
    found = machine.run("find", "/", "(", "-path", "/proc", "-o", "-path", "/sys", "-o", "-path", "/dev", "-o",
                        "-path", "/mnt", ")", "-prune", "-o", "-name", "*aqtune*", "-print", check=False).stdout
    assert found.split() == []
    for path in ("/etc/aqtune", "/var/lib/aqtune"):
        assert machine.run("test", "-e", path, check=False).returncode != 0, path
    assert MESSAGE_IDS["drops"] not in machine.run("journalctl", "--list-catalog").stdout
    assert not _aqtune_processes(machine)


def purge(machine: Container) -> None:
    """apt-get purge, which must not warn (a package owning /lib/systemd/system on a merged-/usr
    system makes dpkg warn that it cannot remove the directory)."""
    result = machine.run("apt-get", "purge", "-y", "aqtune", timeout=300)
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if "warning" in line.lower()]
    assert not warnings, result.stdout + result.stderr


def edit_policy(machine: Container, old: str, new: str) -> str:
    text = machine.read(POLICY)
    assert old in text, f"{old!r} not in {POLICY}"
    edited = text.replace(old, new, 1)
    machine.write(POLICY, edited)
    return edited


# --- host side: the package and its unit, nothing installed on the host ---


def test_lintian_has_no_errors_and_only_the_allowed_warning(package: Package) -> None:
    assert not lintian_problems(package.lintian), "\n".join(package.lintian)


def test_package_ships_what_the_issue_lists(package: Package) -> None:
    missing = [path for path in PACKAGE_PATHS if not (package.root / path.lstrip("/")).exists()]
    assert not missing
    # /lib is an alias of /usr/lib on merged-/usr systems: Debian 13's lintian rejects files under it.
    assert sorted(p.name for p in package.root.iterdir()) == ["etc", "usr"]
    fields = {name: subprocess.run(["dpkg-deb", "-f", str(package.deb), name], capture_output=True, text=True,
                                   check=True, env=clean_env()).stdout.strip()
              for name in ("Architecture", "Depends", "Recommends")}
    assert fields["Architecture"] == "all"
    depends = {clause.split()[0] for clause in fields["Depends"].split(", ")}
    assert {"python3-bpfcc", "python3-structlog"} <= depends
    assert "python3-sdnotify" not in depends  # aqtune.act.notify is its own sender
    assert "linux-headers" in fields["Recommends"]
    conffiles = subprocess.run(["dpkg-deb", "-I", str(package.deb), "conffiles"], capture_output=True, text=True,
                               check=True, env=clean_env()).stdout.split()
    assert conffiles == [POLICY]


def test_unit_verifies_on_the_host(package: Package) -> None:
    """`systemd-analyze verify` checks ExecStart and the man pages exist, so it runs with the
    package's /usr laid over the host's in a private mount namespace: the host is not touched.
    It exits 0 on unknown keys and bad values, so its output must be empty. It writes
    /run/systemd/systemd-units-load: a private /run takes that, whether or not the host has a
    /run/systemd (one whose PID 1 is not systemd may not)."""
    usr = package.root / "usr"
    script = ('mount -t overlay overlay -o "lowerdir=$1:/usr" /usr && mount -t tmpfs tmpfs /run '
              f"&& exec systemd-analyze verify {UNIT_FILE}")
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(usr)],
                            capture_output=True, text=True, env=clean_env(), timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_unit_security_offline_meets_the_target(package: Package) -> None:
    unit = package.root / UNIT_PATH
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                             f"--threshold={int(MAX_EXPOSURE * 10)}", str(unit)],
                            capture_output=True, text=True, env=clean_env(), timeout=60)
    NOTES["exposure offline (host)"] = str(exposure(result.stdout))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert exposure(result.stdout) <= MAX_EXPOSURE


# --- in the container, in order ---


def test_lintian_of_the_release_passes_the_upload(machine: Container, release: Release, package: Package) -> None:
    """The release's own lintian on the upload the host built (package and source): whichever
    release built it, both releases' lintian must pass it."""
    result = machine.run(*LINTIAN_COMMAND, f"/mnt/debs/{package.changes.name}", check=False, timeout=300)
    lines = [line for line in (result.stdout + result.stderr).splitlines()
             if line and "running with root privileges" not in line]
    version = machine.run("dpkg-query", "-W", "-f=${Version}", "lintian").stdout
    NOTES[f"{release.suite}: lintian {version}"] = "; ".join(lines)
    assert result.returncode == 0 and not lintian_problems(lines), "\n".join(lines)


def test_install_enables_and_starts_the_service(machine: Container, release: Release, package: Package) -> None:
    started = time.monotonic()
    machine.run("apt-get", "install", "-y", f"/mnt/debs/{package.deb.name}", timeout=300)
    NOTES[f"{release.suite}: apt-get install in the container"] = f"{time.monotonic() - started:.1f} s"
    assert machine.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    props = wait_running(machine)
    NOTES[f"{release.suite}: status line"] = props["StatusText"]
    # It says whether eBPF runs, and why not when it does not; either way it runs.
    entries = journal(machine)
    ebpf = [e["MESSAGE"] for e in entries if str(e.get("MESSAGE", "")).startswith(("eBPF: ", "eBPF unavailable"))]
    assert ebpf, [e.get("MESSAGE") for e in entries]
    NOTES[f"{release.suite}: eBPF in the container"] = ebpf[0].split("\n")[0]
    if ebpf[0].startswith("eBPF unavailable"):
        degraded = [e for e in entries if e.get("MESSAGE_ID") == MESSAGE_IDS["degraded"]]
        assert degraded and degraded[0]["AQTUNE_EBPF"] == "unavailable"


def test_unit_verifies_where_it_is_installed(machine: Container) -> None:
    # No man(1) in a minbase system: the man pages are checked on the host.
    assert machine.run("dpkg-query", "-L", "aqtune").stdout.split().count(UNIT_FILE) == 1
    result = machine.run("systemd-analyze", "verify", "--man=no", UNIT_FILE, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_journal_catalog_is_installed(machine: Container) -> None:
    result = machine.run("journalctl", "--list-catalog", MESSAGE_IDS["drops"])
    assert MESSAGE_IDS["drops"] in result.stdout


def test_status_shows_the_running_daemon(machine: Container) -> None:
    table = machine.run("aqtune", "status").stdout
    assert "the running daemon's state" in table
    assert "NETNS" in table and "LISTENER" in table
    document = status_json(machine)
    assert document["source"] == "daemon"
    assert document["daemon"]["pid"] == int(show(machine, "MainPID")["MainPID"])
    assert document["daemon"]["policy"] == POLICY
    assert {"listeners", "namespaces", "ebpf"} <= set(document)
    assert [ns["name"] for ns in document["namespaces"]] == ["host"]


def test_status_says_which_probes_attached_how(machine: Container, release: Release) -> None:
    """On the host's kernel (6.18 on this project's machines: tracepoints, no kprobes, fentry
    refused) with the release's bcc and headers: every probe is listed with how it attached or why
    not, and the table's eBPF line agrees."""
    ebpf = status_json(machine)["ebpf"]
    kernel = machine.run("uname", "-r").stdout.strip()
    NOTES[f"{release.suite}: probes on {kernel}"] = "; ".join(f"{k}: {v}" for k, v in ebpf["probes"].items())
    assert ebpf["active"], f"eBPF is off in the {release.suite} container: {ebpf['mode']}"
    assert ebpf["probes"], ebpf
    assert all(PROBE_STATE.match(state) for state in ebpf["probes"].values()), ebpf["probes"]
    assert any(state.startswith("attached") for state in ebpf["probes"].values()), ebpf["probes"]
    assert f"eBPF: on: {ebpf['mode']}" in machine.run("aqtune", "status").stdout


def test_flood_against_a_full_queue_is_journaled(machine: Container, release: Release) -> None:
    machine.run("systemd-run", f"--unit={LISTENER_UNIT}", "--property=Type=exec", "python3", "-c", LISTENER)
    try:
        address = f"127.0.0.1:{LISTENER_PORT}"

        def seen() -> dict[str, Any] | None:
            return next((l for l in status_json(machine)["listeners"] if l["address"] == address), None)

        listener = wait_for(f"the daemon to see {address}", seen)
        assert listener["backlog"] == 1
        assert listener["processes"][0]["unit"] == LISTENER_UNIT
        time.sleep(1.5)  # a second sample: drops count from the difference between two sweeps
        machine.run("python3", "-c", FLOOD, timeout=30)
        entries = wait_for("a drop entry in the journal",
                           lambda: journal(machine, f"MESSAGE_ID={MESSAGE_IDS['drops']}"), timeout=30)
        entry = entries[0]
        assert entry["_SYSTEMD_UNIT"] == UNIT
        assert entry["SYSLOG_IDENTIFIER"] == "aqtune"
        assert entry["PRIORITY"] in ("3", "4")
        assert entry["AQTUNE_LISTENER"] == address
        assert entry["AQTUNE_NETNS"] == "host"
        assert entry["AQTUNE_UNIT"] == LISTENER_UNIT
        assert int(entry["AQTUNE_PID"]) == listener["processes"][0]["pid"]
        assert int(entry["AQTUNE_DROPS"]) > 0
        assert int(entry["AQTUNE_BACKLOG"]) == 1
        assert int(entry["AQTUNE_QUEUE"]) >= 1
        assert f"{address} ({LISTENER_UNIT}) dropped" in entry["MESSAGE"]
        NOTES[f"{release.suite}: drop entry"] = entry["MESSAGE"]
    finally:
        machine.run("systemctl", "stop", LISTENER_UNIT, check=False)


SOCKET_PORT = 8766
SOCKET_SERVICE = "aqtest-activated"
# The service systemd starts on the first connection: it takes the listener from LISTEN_FDS (fd 3) and
# serves a connection every 10 ms: it keeps up between bursts, which overflow the queue systemd
# created with Backlog=2.
ACTIVATED = textwrap.dedent("""
    import socket, time
    s = socket.socket(fileno=3)
    while True:
        c, _ = s.accept()
        c.close()
        time.sleep(0.01)
""")
BURSTS = textwrap.dedent(f"""
    import socket, time
    for _ in range(25):
        clients = []
        for _ in range(100):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", {SOCKET_PORT}))
            clients.append(c)
        time.sleep(2)
        for c in clients:
            c.close()
""")


def test_a_socket_activated_listener_is_advised_on_its_socket_unit(machine: Container, release: Release) -> None:
    # Issue 14: systemd called listen(), so the knob is the .socket unit's Backlog=, and a new backlog
    # takes a restart of the .socket unit (restarting the service alone keeps the old listener).
    machine.run("systemd-run", f"--unit={SOCKET_SERVICE}", f"--socket-property=ListenStream=127.0.0.1:{SOCKET_PORT}",
                "--socket-property=Backlog=2", "--property=Type=exec", "python3", "-c", ACTIVATED)
    try:
        address = f"127.0.0.1:{SOCKET_PORT}"

        def seen() -> dict[str, Any] | None:
            return next((l for l in status_json(machine)["listeners"] if l["address"] == address), None)

        listener = wait_for(f"the daemon to see {address}", seen)
        assert listener["backlog"] == 2
        # Bursts for up to 50 s, in the background: the service appears as a holder of the listener only
        # once the daemon's owner scan sees it (at most 30 s after systemd started it).
        machine.run("systemd-run", "--unit=aqtest-bursts", "--property=Type=exec", "python3", "-c", BURSTS)

        def advised() -> str | None:
            state = json.loads(machine.read("/var/lib/aqtune/status.json"))
            found = [a["text"] for l in state["listeners"] if l["address"] == address for a in l["advice"]
                     if a["id"] == "capped-by-app"]
            return next((text for text in found if "systemctl stop" in text), None)

        text = wait_for("capped-by-app advice naming the socket unit", advised, timeout=60)
        assert "set `Backlog=" in text and "[Socket] section of the .socket unit" in text, text
        assert f"systemctl stop {SOCKET_SERVICE}.service {SOCKET_SERVICE}.socket && systemctl start " \
               f"{SOCKET_SERVICE}.socket" in text, text
        NOTES[f"{release.suite}: socket-activated advice"] = text
    finally:
        machine.run("systemctl", "stop", "aqtest-bursts.service", f"{SOCKET_SERVICE}.socket",
                    f"{SOCKET_SERVICE}.service", check=False)


def test_reload_applies_an_edited_policy_and_refuses_a_broken_one(machine: Container) -> None:
    pid = show(machine, "MainPID")["MainPID"]
    lifecycle = f"MESSAGE_ID={MESSAGE_IDS['lifecycle']}"
    good = edit_policy(machine, "\ninterval = 1.0\n", "\ninterval = 2.0\n")
    machine.run("aqtune", "check", "--config", POLICY)
    before = len(journal(machine, lifecycle))
    machine.run("systemctl", "reload", UNIT)
    reloaded = wait_for("the reload entry", lambda: journal(machine, lifecycle)[before:])
    assert reloaded[0]["MESSAGE"] == f"policy reloaded from {POLICY}: mode recommend, interval 2 s"
    wait_for("the daemon to sweep every 2 s", lambda: daemon_state(machine)["interval"] == 2.0)
    try:
        edit_policy(machine, "\ninterval = 2.0\n", '\ninterval = "fast"\n')
        check = machine.run("aqtune", "check", "--config", POLICY, check=False)
        assert check.returncode == 2
        assert re.match(rf"{POLICY}:\d+: interval: must be a number", check.stderr), check.stderr
        before = len(journal(machine, lifecycle))
        machine.run("systemctl", "reload", UNIT)
        refused = wait_for("the refusal entry", lambda: journal(machine, lifecycle)[before:])
        assert refused[0]["MESSAGE"].startswith("policy reload refused, keeping the previous policy: ")
        assert "interval" in refused[0]["MESSAGE"]
        assert refused[0]["PRIORITY"] == "3"
        time.sleep(2.5)  # a sweep under whatever policy is now in force
        assert show(machine, "ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": pid}
        assert daemon_state(machine)["interval"] == 2.0
    finally:
        machine.write(POLICY, good)  # the local edit the upgrade test keeps
        machine.run("systemctl", "reload", UNIT)


def test_watchdog_restarts_a_hung_daemon(machine: Container, release: Release) -> None:
    dropin = "/etc/systemd/system/aqtune.service.d"
    machine.run("mkdir", "-p", dropin)
    # TimeoutAbortSec bounds the wait should SIGABRT not end it.
    machine.write(f"{dropin}/systest-watchdog.conf", "[Service]\nWatchdogSec=3\nTimeoutAbortSec=5\n")
    try:
        machine.run("systemctl", "daemon-reload")
        machine.run("systemctl", "restart", UNIT)
        props = wait_running(machine)
        assert show(machine, "WatchdogUSec")["WatchdogUSec"] == "3s"
        time.sleep(7)  # more than two periods: a daemon that pings is left alone
        assert show(machine, "MainPID", "NRestarts", "ActiveState") == {
            "MainPID": props["MainPID"], "NRestarts": props["NRestarts"], "ActiveState": "active"}
        # SIGSTOP freezes the loop, and with it the pings, as a hung sweep would.
        machine.run("kill", "-STOP", props["MainPID"])
        started = time.monotonic()

        def restarted_by_watchdog() -> dict[str, str] | None:
            now = running(machine)
            if now and int(now["NRestarts"]) > int(props["NRestarts"]) and now["MainPID"] != props["MainPID"]:
                return now
            return None

        restarted = wait_for("a restart by the watchdog", restarted_by_watchdog, timeout=40)
        NOTES[f"{release.suite}: watchdog"] = f"restarted {time.monotonic() - started:.1f} s after SIGSTOP"
        assert int(restarted["NRestarts"]) == int(props["NRestarts"]) + 1
        messages = [str(e.get("MESSAGE")) for e in journal(machine)]
        assert any(m.startswith(f"{UNIT}: Watchdog timeout (limit 3s)") for m in messages), messages[-20:]
        assert f"{UNIT}: Failed with result 'watchdog'." in messages, messages[-20:]
    finally:
        machine.run("rm", "-rf", dropin)
        machine.run("systemctl", "daemon-reload")
        machine.run("systemctl", "restart", UNIT)
    wait_running(machine)


def test_security_exposure_in_the_container(machine: Container, release: Release) -> None:
    result = machine.run("systemd-analyze", "security", "--no-pager", f"--threshold={int(MAX_EXPOSURE * 10)}", UNIT,
                         check=False)
    score = exposure(result.stdout)
    NOTES[f"{release.suite}: exposure in the container"] = str(score)
    assert result.returncode == 0 and score <= MAX_EXPOSURE, result.stdout[-3000:]


def test_upgrade_keeps_the_edited_policy_and_restarts(machine: Container, package: Package) -> None:
    edited = machine.read(POLICY)
    assert "\ninterval = 2.0\n" in edited
    pid = show(machine, "MainPID")["MainPID"]
    # No terminal to answer dpkg's conffile question: keep the admin's file, as unattended upgrades do.
    machine.run("apt-get", "install", "-y", "-o", "Dpkg::Options::=--force-confdef",
                "-o", "Dpkg::Options::=--force-confold", f"/mnt/debs/{package.upgrade.name}", timeout=300)
    version = machine.run("dpkg-query", "-W", "-f=${Version}", "aqtune").stdout
    assert version == package.version + UPGRADE_VERSION_SUFFIX
    assert machine.read(POLICY) == edited
    assert machine.read(f"{POLICY}.dpkg-dist").endswith(UPGRADE_POLICY_LINE)
    props = wait_running(machine)
    assert props["MainPID"] != pid
    assert daemon_state(machine)["interval"] == 2.0


def test_remove_stops_the_service_and_keeps_the_config(machine: Container) -> None:
    machine.run("apt-get", "remove", "-y", "aqtune", timeout=300)
    assert show(machine, "ActiveState")["ActiveState"] == "inactive"
    assert not _aqtune_processes(machine)
    status = machine.run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "aqtune").stdout
    assert status.strip() == "rc"
    machine.run("test", "-f", POLICY)


def test_purge_leaves_nothing_behind(machine: Container) -> None:
    purge(machine)
    assert_purged(machine)


def test_upgrade_from_the_lib_layout_keeps_the_unit_and_the_edited_policy(machine: Container,
                                                                          package: Package) -> None:
    """From the package as it was laid out before (unit in /lib/systemd/system) to this one: on a
    merged-/usr system both paths are the same file, which dpkg must not delete as the old
    package's leftover. The unit stays enabled and running, and the edited policy is kept."""
    machine.run("apt-get", "install", "-y", f"/mnt/debs/{package.old_layout.name}", timeout=300)
    installed = machine.run("dpkg-query", "-W", "-f=${Version}", "aqtune").stdout
    assert installed == package.version + OLD_LAYOUT_VERSION_SUFFIX
    assert "/" + OLD_UNIT_PATH in machine.run("dpkg-query", "-L", "aqtune").stdout.split()
    before = wait_running(machine)
    edited = edit_policy(machine, "\ninterval = 1.0\n", "\ninterval = 1.0\n# edited before the layout change\n")
    machine.run("apt-get", "install", "-y", "-o", "Dpkg::Options::=--force-confdef",
                "-o", "Dpkg::Options::=--force-confold", f"/mnt/debs/{package.deb.name}", timeout=300)
    assert machine.run("dpkg-query", "-W", "-f=${Version}", "aqtune").stdout == package.version
    listed = machine.run("dpkg-query", "-L", "aqtune").stdout.split()
    assert UNIT_FILE in listed and "/" + OLD_UNIT_PATH not in listed
    machine.run("test", "-f", UNIT_FILE)
    assert machine.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    assert machine.read(POLICY) == edited
    after = wait_running(machine)
    assert after["MainPID"] != before["MainPID"]
    machine.run("systemd-analyze", "verify", "--man=no", UNIT_FILE)


def test_purge_after_the_layout_upgrade_leaves_nothing_behind(machine: Container) -> None:
    purge(machine)
    assert_purged(machine)


def _aqtune_processes(machine: Container) -> list[str]:
    """Command lines of processes running /usr/bin/aqtune (no procps in a minbase system). The path
    is split in the script, or the script's own command line would match."""
    script = ("import glob\n"
              "for p in glob.glob('/proc/[0-9]*/cmdline'):\n"
              "    try:\n"
              "        c = open(p, 'rb').read().replace(b'\\0', b' ').decode()\n"
              "    except OSError:\n"
              "        continue\n"
              "    if '/usr/bin/' + 'aqtune' in c:\n"
              "        print(p, c)\n")
    return machine.run("python3", "-c", script).stdout.splitlines()


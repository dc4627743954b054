"""`aqtune run` as a service on the real system: a private systemd-journald receiving its entries, a real
NOTIFY_SOCKET, SIGHUP reloads, and faults put under it for real
(headers or bcc hidden by a mount, netlink refused by seccomp, a namespace deleted mid-sweep, /proc/sys
or the state directory read-only, no journald).

Every daemon watches an ``aqt-*`` namespace of its own (the mid-sweep test watches all namespaces, in
dry-run, and asserts only about its own) and only writes sysctls in the /proc/sys test, where they are
read-only; conftest checks the host's values are unchanged. Every process started here is killed after
its test, whatever the outcome.

Two module-scoped runs keep the file fast: one daemon with eBPF serves the journal, status and
sd_notify tests (bcc compiles for seconds), and the rate-limit daemon runs in the background from the
first test in the file to the last ones, which need a minute to pass since its first entries: the other
tests run meanwhile instead of a sleep.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aqtune.act.log import MESSAGE_IDS
from tests.helpers import journald
from tests.helpers.aqtune_run import aqtune, ledger_changes, write_policy
from tests.helpers.journald import Journald
from tests.helpers.namespace import HELPERS, PYTHON, REPO, HelperProcess, TestNamespace, wait_until
from tests.helpers.notify import NotifyListener
from tests.helpers.service import (
    ServiceDaemon,
    read_state,
    unshare_mount,
    wait_for_state,
)
from tests.integration.expect import bursts, draining_listener, flood_target, wait_for_queues

pytestmark = pytest.mark.integration

DROPS_ID = MESSAGE_IDS["drops"]
RECOMMENDATION_ID = MESSAGE_IDS["recommendation"]
DEGRADED_ID = MESSAGE_IDS["degraded"]
LIFECYCLE_ID = MESSAGE_IDS["lifecycle"]
SOMAXCONN = "net.core.somaxconn"
INTERVAL = 0.5
CAPPED = 64  # the test namespaces' somaxconn, which caps a listen(1024)
ASKED = 1024
SMALL_BACKLOG = 8  # listen(8): the accept queue holds 9
FLOOD = 30  # connects to the listen(8) listener: 9 queue, 21 SYNs dropped at once and again on each retransmit
WATCHDOG_USEC = 1_000_000
START_TIMEOUT = 60.0  # bcc compiles bpf/aqtune.c at start: seconds on a loaded 2-core machine
RATE_WINDOW = 1
RATE_PER_MINUTE = 2
RATE_LISTENERS = 4
# /proc/sys read-only in the daemon's mount namespace only: every sysctl write there fails with EROFS.
READ_ONLY_PROC_SYS = unshare_mount("mount --bind /proc/sys /proc/sys\nmount -o remount,bind,ro /proc/sys")


def policy_text(ns: str, *, mode: str = "recommend", interval: float = INTERVAL, window: float = 2,
                per_minute: int = 30, textfile: str = "", extra: str = "") -> str:
    # [metrics] textfile is always set: the default is node_exporter's directory on the host.
    # [apply] namespaces names the test's namespace only, so even apply mode cannot reach another one.
    return f"""\
mode = "{mode}"
interval = {interval}
{extra}
[saturation]
sustain = 1

[somaxconn]
min = 128
max = 1000
step = 4.0
cooldown = 3600

[apply]
namespaces = ["{ns}"]

[journal]
window = {window}
max_per_minute = {per_minute}

[metrics]
textfile = "{textfile}"
"""


def requires(reason: str | None) -> None:
    if reason is not None:
        pytest.skip(reason)


def status_json(*args: str) -> dict[str, Any]:
    done = aqtune("status", "--json", *args)
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def listener_in(document: dict[str, Any], ns: str, address: str) -> dict[str, Any]:
    found = [l for l in document["listeners"] if l["netns"] == ns and l["address"] == address]
    assert len(found) == 1, f"{ns} {address} in {[(l['netns'], l['address']) for l in document['listeners']]}"
    return found[0]


def namespace_named(document: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((n for n in document["namespaces"] if n["name"] == name), None)


def namespace_error(document: dict[str, Any], name: str) -> str | None:
    namespace = namespace_named(document, name)
    assert namespace is not None, f"{name} not in {[n['name'] for n in document['namespaces']]}"
    error: str | None = namespace["error"]
    return error


def capped_listener(ns: TestNamespace, load: contextlib.ExitStack) -> tuple[HelperProcess, dict[str, Any]]:
    """A listen(1024) capped to 64 by the namespace's somaxconn, whose worker drains its queue fast but is hit
    every 2 s by a burst of 120 (55 over): the case a longer queue helps, so aqtune wants somaxconn raised."""
    ns.set_sysctl(SOMAXCONN, CAPPED)
    helper, listener = draining_listener(ns, f"tcp4:{ASKED}")
    assert ns.ss_tcp()[listener["address"]].backlog == CAPPED
    load.enter_context(bursts(ns, listener, 120, every=2.0, waves=100))
    return helper, listener


@pytest.fixture
def load() -> Iterator[contextlib.ExitStack]:
    """Load started by a test, stopped after it whatever its outcome."""
    with contextlib.ExitStack() as stack:
        yield stack


def field_int(entry: dict[str, Any], name: str) -> int:
    return int(entry[name])


def realtime(entry: dict[str, Any]) -> float:
    return int(entry["__REALTIME_TIMESTAMP"]) / 1e6


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[..., ServiceDaemon]]:
    """Starts ServiceDaemons; every one is killed after the test, whatever its outcome (they run in the host
    namespace, so namespace teardown would not reach them)."""
    daemons: list[ServiceDaemon] = []

    def start(args: list[str], env: dict[str, str] | None = None, prefix: list[str] | None = None) -> ServiceDaemon:
        daemon = ServiceDaemon(args, tmp_path / f"daemon-{len(daemons)}.log", env=env, prefix=prefix or [])
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.kill()


def console(**extra: str) -> dict[str, str]:
    # Forced, so the daemon's key=value lines land in its log file whatever the host has in /run/systemd.
    return {"AQTUNE_LOG": "console", **extra}


# --- the journal's rate limit: a background daemon from the first of these tests to the last test -------


@dataclass
class RateRun:
    ns: TestNamespace
    state: Path
    metrics: Path
    journal: Journald
    daemon: ServiceDaemon
    listeners: list[dict[str, Any]]
    seen: dict[str, Any] = field(default_factory=dict)  # what late_entries found, for the tests after it


@pytest.fixture(scope="module")
def rate_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RateRun]:
    """RATE_LISTENERS listen(2) listeners flooded at once, window 1 s, at most 2 entries a minute."""
    requires(journald.available())
    base = tmp_path_factory.mktemp("rate")
    with contextlib.ExitStack() as stack:
        ns = TestNamespace(f"aqt-{os.getpid()}-rate")
        stack.callback(ns.destroy)
        helper = ns.listen(*["tcp4:2"] * RATE_LISTENERS, life=250)  # past the minute the last tests wait for
        listeners = helper.ready()["listeners"]
        journal = stack.enter_context(journald.private_journald(base / "journal"))
        state, metrics = base / "state", base / "metrics" / "aqtune.prom"
        metrics.parent.mkdir()
        policy = write_policy(base / "policy.toml", policy_text(ns.name, window=RATE_WINDOW,
                                                                per_minute=RATE_PER_MINUTE, textfile=str(metrics)))
        daemon = ServiceDaemon(["--config", str(policy), "--netns", ns.name, "--state-dir", str(state), "--dry-run",
                                "--no-ebpf"], base / "daemon.log",
                               env={"AQTUNE_LOG": "journal", "AQTUNE_JOURNAL_SOCKET": journal.socket})
        stack.callback(daemon.kill)
        wait_for_state(state, daemon, timeout=START_TIMEOUT)
        ns.flood([(flood_target(listener), 10) for listener in listeners], hold=200)
        yield RateRun(ns, state, metrics, journal, daemon, listeners)


def suppressed_metric(path: Path) -> int:
    match = re.search(r"^aqtune_journal_suppressed_total (\d+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
    assert match is not None, path.read_text(encoding="utf-8")
    return int(match.group(1))


def test_rate_limit_holds_drop_entries_to_max_per_minute(rate_run: RateRun) -> None:
    run = rate_run
    entries = run.journal.wait_for(f"MESSAGE_ID={DROPS_ID}", count=RATE_PER_MINUTE, alive=run.daemon.alive)
    # Four listeners closed their first window together: two entries, two suppressed, and every window
    # after that within the minute suppressed too.
    wait_until(lambda: (d := read_state(run.state)) and d["daemon"]["journal_suppressed"] >= 4
               and suppressed_metric(run.metrics) >= 4, "four suppressed episodes in status and metrics", timeout=10)
    # What was swallowed within the first minute, for the entry a minute later to report (late_entries).
    run.seen.setdefault("swallowed", read_state(run.state)["daemon"]["journal_suppressed"])
    later = run.journal.entries(f"MESSAGE_ID={DROPS_ID}")
    assert len(later) == RATE_PER_MINUTE, [e["MESSAGE"] for e in later]
    assert all("AQTUNE_SUPPRESSED" not in e for e in later)
    assert {e["AQTUNE_LISTENER"] for e in entries} <= {l["address"] for l in run.listeners}


# --- the journal, live status and sd_notify, from one daemon with eBPF -------------------------------------


@dataclass
class EbpfRun:
    ns: TestNamespace
    state: Path
    journal: Journald
    notify: NotifyListener
    daemon: ServiceDaemon
    capped: dict[str, Any]
    dropper: dict[str, Any]
    dropper_pid: int
    ss_drops_before: int  # the dropping listener's socket drop counter before the flood
    burst: int  # drops it counted within a moment of the flood
    nstat_before: dict[str, int]
    ready_at: float


@pytest.fixture(scope="module")
def ebpf_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EbpfRun]:
    """`aqtune run --dry-run` with eBPF on one namespace, as systemd runs it: entries to a private journald,
    NOTIFY_SOCKET and WATCHDOG_USEC set. The namespace holds a somaxconn-capped listener hit by bursts (a
    recommendation) and a never-accepting listen(8) one flooded after the first sweep (drop entries)."""
    requires(journald.available())
    base = tmp_path_factory.mktemp("ebpf")
    with contextlib.ExitStack() as stack:
        ns = TestNamespace(f"aqt-{os.getpid()}-ebpf")
        stack.callback(ns.destroy)
        _, capped = capped_listener(ns, stack)
        helper = ns.listen(f"tcp4:{SMALL_BACKLOG}")
        (dropper,) = helper.ready()["listeners"]
        journal = stack.enter_context(journald.private_journald(base / "journal"))
        state = base / "state"
        notify = NotifyListener(base / "notify", watch=state / "status.json")
        stack.callback(notify.close)
        policy = write_policy(base / "policy.toml", policy_text(ns.name))
        daemon = ServiceDaemon(
            ["--config", str(policy), "--netns", ns.name, "--state-dir", str(state), "--dry-run"], base / "daemon.log",
            env={"AQTUNE_LOG": "journal", "AQTUNE_JOURNAL_SOCKET": journal.socket,
                 "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        stack.callback(daemon.kill)
        ready = wait_until(lambda: notify.with_line("READY=1") or daemon.alive(), "READY=1", timeout=START_TIMEOUT)
        assert isinstance(ready, list), ready
        # The model needs one sample before the drops, so the flood comes after the first sweep.
        nstat_before = ns.nstat()
        before = ns.ss_tcp()[dropper["address"]].drops or 0
        ns.flood([(flood_target(dropper), FLOOD)], hold=200)
        rows = wait_for_queues(ns, {dropper["address"]: SMALL_BACKLOG + 1},
                               min_drops={dropper["address"]: before + FLOOD - SMALL_BACKLOG - 1})
        yield EbpfRun(ns, state, journal, notify, daemon, capped, dropper, helper.ready()["pid"], before,
                      (rows[dropper["address"]].drops or 0) - before, nstat_before, ready[0].at)


def test_drop_episode_reaches_journald_with_its_fields(ebpf_run: EbpfRun) -> None:
    run = ebpf_run
    address = run.dropper["address"]
    entries = run.journal.wait_for(f"MESSAGE_ID={DROPS_ID}", f"AQTUNE_LISTENER={address}", alive=run.daemon.alive)
    first = entries[0]
    assert first["SYSLOG_IDENTIFIER"] == "aqtune"
    assert first["_TRANSPORT"] == "journal"
    assert int(first["_PID"]) == run.daemon.pid
    # One window of drops is a warning; only three windows in a row make it an error.
    assert first["PRIORITY"] == "4", first
    assert all(e["PRIORITY"] in ("3", "4") for e in entries), entries
    assert first["AQTUNE_NETNS"] == run.ns.name
    assert field_int(first, "AQTUNE_PID") == run.dropper_pid
    assert (field_int(first, "AQTUNE_QUEUE"), field_int(first, "AQTUNE_BACKLOG")) == (SMALL_BACKLOG + 1,
                                                                                      SMALL_BACKLOG)
    drops = field_int(first, "AQTUNE_DROPS")
    message = re.match(rf"{re.escape(address)} \(aqt-listen\) dropped (\d+) connection attempts in \d+ s: "
                       rf"accept queue full {SMALL_BACKLOG + 1}/{SMALL_BACKLOG}", first["MESSAGE"])
    assert message is not None, first["MESSAGE"]
    assert int(message.group(1)) == drops
    # The first episode holds at least the flood's burst; every entry together no more than the kernel's
    # ListenDrops and the socket's drop counter rose (the capped listener was filled without a drop).
    assert drops >= run.burst > 0
    logged = sum(field_int(e, "AQTUNE_DROPS") for e in entries)
    listen_drops = run.ns.nstat()["TcpExtListenDrops"] - run.nstat_before["TcpExtListenDrops"]
    socket_drops = (run.ns.ss_tcp()[address].drops or 0) - run.ss_drops_before
    assert logged <= min(listen_drops, socket_drops), (logged, listen_drops, socket_drops)
    status = listener_in(status_json("--state-dir", str(run.state), "--netns", run.ns.name), run.ns.name, address)
    assert address == f"127.0.0.1:{run.dropper['port']}" == status["address"]


def test_recommendation_reaches_journald_once(ebpf_run: EbpfRun) -> None:
    run = ebpf_run
    (entry,) = run.journal.wait_for(f"MESSAGE_ID={RECOMMENDATION_ID}", alive=run.daemon.alive)
    assert entry["SYSLOG_IDENTIFIER"] == "aqtune"
    assert entry["PRIORITY"] == "6"
    assert (entry["AQTUNE_NETNS"], entry["AQTUNE_SYSCTL"], entry["AQTUNE_OLD"]) == (run.ns.name, SOMAXCONN,
                                                                                   str(CAPPED))
    assert CAPPED < field_int(entry, "AQTUNE_NEW") <= 1000
    assert "capped by somaxconn" in entry["AQTUNE_REASON"]
    assert entry["MESSAGE"].endswith("not applied: dry run"), entry["MESSAGE"]
    # Said once, not once per sweep, and never acted on.
    seen = wait_for_state(run.state, run.daemon, after=realtime(entry) + 3 * INTERVAL, what="three more sweeps")
    assert len(run.journal.entries(f"MESSAGE_ID={RECOMMENDATION_ID}")) == 1
    assert (namespace_named(seen, run.ns.name) or {}).get("sysctls", {}).get(SOMAXCONN) == CAPPED
    assert run.ns.sysctls(SOMAXCONN)[SOMAXCONN] == CAPPED


def test_degraded_probe_reaches_journald(ebpf_run: EbpfRun) -> None:
    run = ebpf_run
    probes = wait_for_state(run.state, run.daemon)["ebpf"]["probes"]
    how = probes.get("tcp_conn_request", "")
    if how.startswith("attached"):
        pytest.skip(f"this kernel lets tcp_conn_request be probed ({how}): nothing degraded to report")
    (entry,) = run.journal.wait_for(f"MESSAGE_ID={DEGRADED_ID}", "AQTUNE_PROBE=tcp_conn_request",
                                    alive=run.daemon.alive)
    assert entry["PRIORITY"] == "4"
    assert entry["MESSAGE"] == f"eBPF probe tcp_conn_request {how}"


def test_status_reads_the_running_daemon(ebpf_run: EbpfRun) -> None:
    run = ebpf_run
    address = run.dropper["address"]
    wait_for_state(run.state, run.daemon, after=time.time())
    live = status_json("--state-dir", str(run.state), "--netns", run.ns.name)
    assert live["source"] == "daemon"
    assert {l["netns"] for l in live["listeners"]} == {run.ns.name}
    assert live["ebpf"]["active"] is True
    rows = run.ns.ss_tcp()
    shown = listener_in(live, run.ns.name, address)
    assert (shown["queue"], shown["backlog"]) == (rows[address].queue, rows[address].backlog)
    assert shown["history"]["saturated"] is True, shown["history"]
    # The bursty one's queue changes every 0.1 s: its backlog is what stays put.
    assert listener_in(live, run.ns.name, run.capped["address"])["backlog"] == rows[run.capped["address"]].backlog
    dropping = listener_in(live, run.ns.name, address)
    # eBPF saw the flood's handshakes complete into the queue.
    assert dropping["events"] is not None and dropping["events"]["enqueued"] >= SMALL_BACKLOG + 1, dropping["events"]
    daemon = live["daemon"]
    assert daemon["pid"] == run.daemon.pid
    assert daemon["mode"] == "dry-run"
    assert daemon["drops_last_minute"] > 0
    (action,) = daemon["actions"]
    assert (action["sysctl"], action["old"], action["applied"], action["why_not"]) == (SOMAXCONN, CAPPED, False,
                                                                                       "dry run")
    swept = status_json("--sweep", "--state-dir", str(run.state), "--netns", run.ns.name)
    assert swept["source"] == "sweep"
    assert "daemon" not in swept
    assert listener_in(swept, run.ns.name, address)["queue"] == SMALL_BACKLOG + 1


def test_sd_notify_ready_status_and_watchdog(ebpf_run: EbpfRun) -> None:
    run = ebpf_run
    # Three seconds of pings after READY=1 (they have mostly passed during the tests before).
    wait_until(lambda: (m := run.notify.received()) and m[-1].at - run.ready_at >= 3.0 and m,
               "3 s of notifications after READY=1", timeout=10)
    messages = run.notify.received()
    assert {m.pid for m in messages} == {run.daemon.pid}
    ready = [i for i, m in enumerate(messages) if m.has("READY=1")]
    assert len(ready) == 1
    # READY=1 only once the first sweep is published, and before any STATUS=.
    assert messages[ready[0]].witness is True
    assert all(m.value("STATUS") is None for m in messages[:ready[0]])
    status = [m.value("STATUS") for m in messages if m.value("STATUS") is not None]
    assert status, messages
    summary = re.fullmatch(r"watching (\d+) listeners in (\d+) netns; worst fill ([\d.]+) \((.+)\); (\d+) drops in "
                           r"the last minute; mode (\S+); eBPF (\w+)", status[-1] or "")
    assert summary is not None, status[-1]
    listeners, namespaces, fill, worst, drops, mode, ebpf = summary.groups()
    ebpf_mode = wait_for_state(run.state, run.daemon)["ebpf"]["mode"]  # "partial: ..." here, "full" elsewhere
    assert (int(listeners), int(namespaces), mode, ebpf) == (2, 1, "dry-run", ebpf_mode.split(":")[0]), status[-1]
    assert float(fill) >= 1.0 and worst in (run.dropper["address"], run.capped["address"])
    assert int(drops) > 0
    # Every WATCHDOG_USEC/2 from the main loop: systemd kills the service after WATCHDOG_USEC without one.
    pings = [m.at for m in messages[ready[0]:] if m.has("WATCHDOG=1")]
    assert len(pings) >= 5, pings
    gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
    half = WATCHDOG_USEC / 2e6
    # The loop sleeps until the next ping, check or sweep is due and pings after the sweep of the same
    # iteration, so a ping is normally on time; on a loaded 2-core machine a slow sweep can push one past
    # the period.
    # Never two periods, though, and most within 0.8 s.
    usec = WATCHDOG_USEC / 1e6
    assert max(gaps) < 2 * usec, gaps
    assert sum(gap < 0.8 * usec for gap in gaps) >= 0.8 * len(gaps), gaps
    assert half * 0.9 <= statistics.median(gaps) <= half * 1.4, gaps


def test_sigterm_notifies_stopping_and_status_falls_back_to_a_sweep(ebpf_run: EbpfRun) -> None:
    run = ebpf_run
    wait_for_state(run.state, run.daemon)
    stopping_from = len(run.notify.received())
    assert run.daemon.stop() == 0
    wait_until(lambda: any(m.has("STOPPING=1") for m in run.notify.received()[stopping_from:]), "STOPPING=1")
    run.journal.wait_for(f"MESSAGE_ID={LIFECYCLE_ID}", where=lambda e: e["MESSAGE"] == "aqtune stopped")
    after = status_json("--state-dir", str(run.state), "--netns", run.ns.name)
    assert after["source"] == "sweep"
    assert listener_in(after, run.ns.name, run.dropper["address"])["queue"] == SMALL_BACKLOG + 1


# --- SIGHUP --------------------------------------------------------------------------------------------


def test_sighup_reloads_a_good_policy_and_keeps_the_old_one_over_a_broken_one(
        netns: Callable[[], TestNamespace], started: Callable[..., ServiceDaemon], tmp_path: Path,
        load: contextlib.ExitStack) -> None:
    ns = netns()
    capped_listener(ns, load)
    state = tmp_path / "state"
    policy = write_policy(tmp_path / "policy.toml", policy_text(ns.name))
    daemon = started(["--config", str(policy), "--netns", ns.name, "--state-dir", str(state), "--dry-run",
                      "--no-ebpf"], console())
    recommended = daemon.wait_for(f"recommend {SOMAXCONN}=", timeout=START_TIMEOUT)

    write_policy(policy, policy_text(ns.name, interval=0.3))
    daemon.popen.send_signal(signal.SIGHUP)
    reloaded = daemon.wait_for(f"policy reloaded from {policy}: mode recommend, interval 0.3 s")
    assert wait_for_state(state, daemon, after=time.time())["daemon"]["interval"] == 0.3

    # Each broken file would matter if it were taken: apply mode, a slower interval.
    broken = {
        "syntax": (policy_text(ns.name, mode="apply", interval=5).replace('mode = "apply"', 'mode = "apply'),
                   "TOML syntax error"),
        "unknown key": (policy_text(ns.name, mode="apply", interval=5, extra="intervall = 5"),
                        "intervall: unknown key"),
    }
    after = reloaded
    for text, problem in broken.values():
        write_policy(policy, text)
        daemon.popen.send_signal(signal.SIGHUP)
        after = daemon.wait_for("policy reload refused, keeping the previous policy:", str(policy), problem,
                                after=after)
        assert "error" in daemon.lines()[after]
        document = wait_for_state(state, daemon, after=time.time())
        assert (document["daemon"]["interval"], document["daemon"]["mode"]) == (0.3, "dry-run")
    # Still sweeping at 0.3 s, the recommendation neither repeated nor withdrawn, nothing written.
    first = wait_for_state(state, daemon, after=time.time())
    second = wait_for_state(state, daemon, after=first["taken_at"])
    assert second["taken_at"] - first["taken_at"] < 2.0  # not the broken files' 5 s
    assert [a["sysctl"] for a in second["daemon"]["actions"]] == [SOMAXCONN]
    assert daemon.count(f"recommend {SOMAXCONN}=") == 1 and daemon.matching(f"recommend {SOMAXCONN}=") == [recommended]
    assert ns.sysctls(SOMAXCONN)[SOMAXCONN] == CAPPED
    assert daemon.stop() == 0


# --- faults ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("hidden", "reason"), [
    ("/lib/modules", "no kernel headers at /lib/modules/"),
    ("/usr/lib/python3/dist-packages/bcc", "bcc is not installed (Debian package python3-bpfcc)"),
], ids=["no-headers", "no-bcc"])
def test_without_headers_or_bcc_it_runs_on_sweeps_and_says_why(
        netns: Callable[[], TestNamespace], started: Callable[..., ServiceDaemon], tmp_path: Path,
        hidden: str, reason: str) -> None:
    # BPF refused by the kernel is covered in tests/integration/test_ebpf.py.
    if not os.path.isdir(hidden):
        pytest.skip(f"{hidden} is absent here already")
    ns = netns()
    helper = ns.listen(f"tcp4:{SMALL_BACKLOG}")
    (listener,) = helper.ready()["listeners"]
    state = tmp_path / "state"
    policy = write_policy(tmp_path / "policy.toml", policy_text(ns.name))
    # An empty tmpfs over the directory, in the daemon's own mount namespace only.
    daemon = started(["--config", str(policy), "--netns", ns.name, "--state-dir", str(state), "--dry-run"],
                     console(), prefix=unshare_mount(f"mount -t tmpfs aqt-hidden {hidden}"))
    line = daemon.wait_for("eBPF unavailable, running on sock_diag sweeps alone:", reason, timeout=START_TIMEOUT)
    assert f"message_id={DEGRADED_ID}" in daemon.lines()[line]
    first = wait_for_state(state, daemon)
    later = wait_for_state(state, daemon, after=first["taken_at"])
    assert later["ebpf"]["active"] is False and reason in later["ebpf"]["mode"], later["ebpf"]
    assert listener_in(later, ns.name, listener["address"])["events"] is None
    assert daemon.stop() == 0


@pytest.fixture
def gate(tmp_path: Path) -> Path:
    pytest.importorskip("seccomp", reason="needs python3-seccomp (Debian) for tests/helpers/netlink_gate.py")
    control = tmp_path / "gate"
    control.mkdir()
    return control


def gated(control: Path) -> list[str]:
    return [PYTHON, str(HELPERS / "netlink_gate.py"), str(control), "--"]


def test_netlink_refused_then_back_the_daemon_says_so_and_recovers(
        netns: Callable[[], TestNamespace], started: Callable[..., ServiceDaemon], tmp_path: Path,
        gate: Path) -> None:
    ns = netns()
    helper = ns.listen(f"tcp4:{SMALL_BACKLOG}")
    (listener,) = helper.ready()["listeners"]
    state = tmp_path / "state"
    policy = write_policy(tmp_path / "policy.toml", policy_text(ns.name))
    daemon = started(["--config", str(policy), "--netns", ns.name, "--state-dir", str(state), "--dry-run",
                      "--no-ebpf"], console(), prefix=gated(gate))
    wait_for_state(state, daemon, timeout=START_TIMEOUT)

    # socket(AF_NETLINK, ..., NETLINK_SOCK_DIAG) denied, as a security module denies it.
    (gate / "fail").write_text("EPERM")
    failed = daemon.wait_for("sweep failed: [Errno 1] Operation not permitted; retrying next interval")
    assert "error" in daemon.lines()[failed]
    daemon.wait_for("sweep failed:", after=failed)  # retried at the next interval, still up
    (gate / "fail").unlink()
    back = wait_for_state(state, daemon, after=time.time(), what="a sweep after netlink came back")
    assert namespace_error(back, ns.name) is None
    assert listener_in(back, ns.name, listener["address"])["backlog"] == SMALL_BACKLOG

    # The kernel without sock_diag: the namespace cannot be read; status says so and the daemon goes on.
    (gate / "fail").write_text("EPROTONOSUPPORT")
    unreadable = wait_until(lambda: (d := read_state(state)) and namespace_error(d, ns.name) and d,
                            "the namespace's error in the state", timeout=10)
    assert namespace_error(unreadable, ns.name) == "could not be read: [Errno 93] Protocol not supported"
    assert unreadable["listeners"] == []
    (gate / "fail").unlink()
    back = wait_for_state(state, daemon, after=time.time(), what="a sweep after sock_diag came back")
    assert listener_in(back, ns.name, listener["address"])["queue"] == 0
    assert daemon.stop() == 0
    assert daemon.count("Traceback") == 0


def test_netlink_unsupported_is_logged(
        netns: Callable[[], TestNamespace], started: Callable[..., ServiceDaemon], tmp_path: Path,
        gate: Path) -> None:
    ns = netns()
    state = tmp_path / "state"
    policy = write_policy(tmp_path / "policy.toml", policy_text(ns.name))
    (gate / "fail").write_text("EPROTONOSUPPORT")
    daemon = started(["--config", str(policy), "--netns", ns.name, "--state-dir", str(state), "--dry-run",
                      "--no-ebpf"], console(), prefix=gated(gate))
    first = wait_for_state(state, daemon, timeout=START_TIMEOUT)
    assert namespace_error(first, ns.name) == "could not be read: [Errno 93] Protocol not supported"
    wait_for_state(state, daemon, after=first["taken_at"])
    daemon.wait_for(ns.name, "Protocol not supported", timeout=2 * INTERVAL)


def test_namespace_vanishing_mid_sweep(
        netns: Callable[[], TestNamespace], started: Callable[..., ServiceDaemon], tmp_path: Path,
        gate: Path) -> None:
    first_ns, second_ns = sorted((netns(), netns()), key=lambda n: n.name)
    kept = first_ns.listen(f"tcp4:{SMALL_BACKLOG}").ready()["listeners"][0]
    gone = second_ns.listen(f"tcp4:{SMALL_BACKLOG}").ready()["listeners"][0]
    state = tmp_path / "state"
    policy = write_policy(tmp_path / "policy.toml", policy_text(first_ns.name))
    # Every namespace, as a host daemon watches them (dry-run: it writes nothing anywhere).
    daemon = started(["--config", str(policy), "--netns", "all", "--state-dir", str(state), "--dry-run",
                      "--no-ebpf"], console(), prefix=gated(gate))
    wait_until(lambda: (d := read_state(state)) and namespace_named(d, second_ns.name) and d,
               "both namespaces swept", timeout=START_TIMEOUT)
    paused = gate / "paused"

    def pause_in(ns: TestNamespace) -> None:
        (gate / "pause.tmp").write_text(str(ns.inode))
        (gate / "pause.tmp").rename(gate / "pause")

    # Stop the daemon inside the first namespace's read (the namespaces are read in name order, so the
    # second one was listed but not read yet), delete the second one with its processes, let it go on.
    first_inode = first_ns.inode
    pause_in(first_ns)
    wait_until(paused.exists, "the sweep paused in the first namespace", timeout=10)
    assert paused.read_text().split()[0] == str(first_inode)
    second_ns.destroy()
    # Pause again in the first namespace's read of the next sweep: the state file then holds the sweep
    # the namespace vanished from, for sure.
    pause_in(first_ns)
    paused.unlink()
    wait_until(paused.exists, "the next sweep paused", timeout=10)
    during = read_state(state)
    paused.unlink()
    assert during is not None
    vanished = namespace_named(during, second_ns.name)
    assert vanished is not None and vanished["error"].startswith("vanished during the sweep"), vanished
    assert not [l for l in during["listeners"] if l["netns"] == second_ns.name]
    assert listener_in(during, first_ns.name, kept["address"])["queue"] == 0

    after = wait_for_state(state, daemon, after=during["taken_at"], what="a sweep after the vanished one")
    after = wait_for_state(state, daemon, after=after["taken_at"])
    assert namespace_named(after, second_ns.name) is None
    assert listener_in(after, first_ns.name, kept["address"])["queue"] == 0
    assert not [l for l in after["listeners"] if l["netns"] == second_ns.name], gone
    assert daemon.count("Traceback") == 0 and daemon.count("sweep failed") == 0
    assert daemon.stop() == 0


def apply_under_read_only_proc_sys(ns: TestNamespace, started: Callable[..., ServiceDaemon],
                                   tmp_path: Path, load: contextlib.ExitStack) -> tuple[Path, ServiceDaemon]:
    """A capped listener hit by bursts in ``ns``, and a daemon in apply mode for it whose /proc/sys is
    read-only, so every sysctl write fails; its state directory and the daemon."""
    capped_listener(ns, load)
    state = tmp_path / "state"
    policy = write_policy(tmp_path / "policy.toml", policy_text(ns.name, mode="apply"))
    daemon = started(["--config", str(policy), "--netns", ns.name, "--state-dir", str(state), "--no-ebpf"],
                     console(), prefix=READ_ONLY_PROC_SYS)
    return state, daemon


def test_read_only_proc_sys_in_apply_mode(
        netns: Callable[[], TestNamespace], started: Callable[..., ServiceDaemon], tmp_path: Path,
        load: contextlib.ExitStack) -> None:
    ns = netns()
    state, daemon = apply_under_read_only_proc_sys(ns, started, tmp_path, load)
    failed = daemon.wait_for(f"could not set {SOMAXCONN} in netns {ns.name}:", "Read-only file system",
                             timeout=START_TIMEOUT)
    assert "error" in daemon.lines()[failed]
    document = wait_for_state(state, daemon, after=time.time())
    wait_for_state(state, daemon, after=document["taken_at"])
    # The intent was recorded before the write and abandoned when it failed: nothing for rollback to undo.
    assert ledger_changes(state) == []
    assert ns.sysctls(SOMAXCONN)[SOMAXCONN] == CAPPED
    assert not [a for a in document["daemon"]["actions"] if a["applied"]], document["daemon"]["actions"]
    assert daemon.count(f"set {SOMAXCONN} {CAPPED} ->") == 0
    assert daemon.stop() == 0


def test_read_only_proc_sys_error_is_not_repeated_every_sweep(
        netns: Callable[[], TestNamespace], started: Callable[..., ServiceDaemon], tmp_path: Path,
        load: contextlib.ExitStack) -> None:
    ns = netns()
    state, daemon = apply_under_read_only_proc_sys(ns, started, tmp_path, load)
    daemon.wait_for(f"could not set {SOMAXCONN} in netns {ns.name}:", timeout=START_TIMEOUT)
    document = wait_for_state(state, daemon, after=time.time())
    for _ in range(4):
        document = wait_for_state(state, daemon, after=document["taken_at"])
    assert daemon.count(f"could not set {SOMAXCONN}") == 1


def test_without_journald_entries_go_to_stderr_until_it_comes(
        netns: Callable[[], TestNamespace], started: Callable[..., ServiceDaemon], tmp_path: Path) -> None:
    requires(journald.available())
    ns = netns()
    state = tmp_path / "state"
    policy = write_policy(tmp_path / "policy.toml", policy_text(ns.name))
    directory = tmp_path / "journal"
    socket_path = directory / "run-systemd" / "journal" / "socket"
    daemon = started(["--config", str(policy), "--netns", ns.name, "--state-dir", str(state), "--dry-run",
                      "--no-ebpf"], {"AQTUNE_LOG": "journal", "AQTUNE_JOURNAL_SOCKET": str(socket_path)})
    daemon.wait_for(f"info: aqtune running: mode dry-run, policy {policy}", f"message_id={LIFECYCLE_ID}",
                    timeout=START_TIMEOUT)
    first = wait_for_state(state, daemon)
    wait_for_state(state, daemon, after=first["taken_at"])
    # journald comes up at that path: the next entry goes to it, not to stderr.
    with journald.private_journald(directory) as journal:
        daemon.popen.send_signal(signal.SIGHUP)
        (entry,) = journal.wait_for(f"MESSAGE_ID={LIFECYCLE_ID}", alive=daemon.alive)
        assert entry["MESSAGE"].startswith(f"policy reloaded from {policy}")
        assert daemon.count("policy reloaded") == 0
        assert daemon.stop() == 0
    assert daemon.count("info: aqtune stopped") == 0


def test_stuck_journald_does_not_stall_the_daemon(
        netns: Callable[[], TestNamespace], started: Callable[..., ServiceDaemon], tmp_path: Path) -> None:
    requires(journald.available())
    ns = netns()
    policy = write_policy(tmp_path / "policy.toml", policy_text(ns.name))
    notify = NotifyListener(tmp_path / "notify")
    # The kernel's default queue of 10 datagrams, so a dozen entries fill it; under systemd it takes 512.
    journal = journald.Journald(tmp_path / "journal", max_dgram_qlen=None)
    try:
        daemon = started(["--config", str(policy), "--netns", ns.name, "--state-dir", str(tmp_path / "state"),
                          "--dry-run", "--no-ebpf"],
                         {"AQTUNE_LOG": "journal", "AQTUNE_JOURNAL_SOCKET": journal.socket,
                          "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        wait_until(lambda: notify.with_line("READY=1") or daemon.alive(), "READY=1", timeout=START_TIMEOUT)
        os.kill(journal.popen.pid, signal.SIGSTOP)
        try:
            # One "policy reloaded" entry per SIGHUP, one SIGHUP per loop tick (0.25 s) so none coalesce.
            for _ in range(12):
                daemon.popen.send_signal(signal.SIGHUP)
                time.sleep(0.3)
            last_hup = time.monotonic()
            time.sleep(1.5)
            pings = [m.at for m in notify.with_line("WATCHDOG=1")]
            assert pings and pings[-1] > last_hup + 0.5, "the daemon stopped pinging the watchdog"
        finally:
            os.kill(journal.popen.pid, signal.SIGCONT)
    finally:
        journal.stop()
        notify.close()


def test_read_only_state_dir_is_reported_once(
        netns: Callable[[], TestNamespace], started: Callable[..., ServiceDaemon], tmp_path: Path) -> None:
    ns = netns()
    state = tmp_path / "state"
    state.mkdir()
    policy = write_policy(tmp_path / "policy.toml", policy_text(ns.name, textfile=str(state / "aqtune.prom")))
    notify = NotifyListener(tmp_path / "notify")
    try:
        daemon = started(["--config", str(policy), "--netns", ns.name, "--state-dir", str(state), "--dry-run",
                          "--no-ebpf"], console(NOTIFY_SOCKET=str(notify.path)),
                         prefix=unshare_mount(f"mount --bind {state} {state}\nmount -o remount,bind,ro {state}"))
        daemon.wait_for(f"cannot write state to {state}: Read-only file system", timeout=START_TIMEOUT)
        daemon.wait_for(f"cannot write {state}/aqtune.prom: Read-only file system")
        # Sweeping on (STATUS= after every sweep), and no second error for either.
        wait_until(lambda: len(notify.with_key("STATUS")) >= 6, "six sweeps", timeout=10)
        assert daemon.count("cannot write state") == 1
        assert daemon.count("cannot write") == 2
        assert list(state.iterdir()) == []
        assert status_json("--state-dir", str(state), "--netns", ns.name)["source"] == "sweep"
        assert daemon.stop() == 0
    finally:
        notify.close()


def test_state_dir_under_a_regular_file_is_reported_once(
        netns: Callable[[], TestNamespace], started: Callable[..., ServiceDaemon], tmp_path: Path) -> None:
    ns = netns()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    state = blocker / "state"
    policy = write_policy(tmp_path / "policy.toml", policy_text(ns.name))
    notify = NotifyListener(tmp_path / "notify")
    try:
        daemon = started(["--config", str(policy), "--netns", ns.name, "--state-dir", str(state), "--dry-run",
                          "--no-ebpf"], console(NOTIFY_SOCKET=str(notify.path)))
        daemon.wait_for(f"cannot write state to {state}", timeout=START_TIMEOUT)
        wait_until(lambda: len(notify.with_key("STATUS")) >= 4, "four sweeps", timeout=10)
        assert daemon.count("cannot write state") == 1
        assert daemon.stop() == 0
    finally:
        notify.close()


# --- the journal catalog --------------------------------------------------------------------------------


def catalog_entries(text: str) -> dict[str, dict[str, str]]:
    """id -> header fields of a journal catalog file (catalog(7) syntax: ``-- ID`` starts an entry)."""
    entries: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    in_header = False
    for line in text.splitlines():
        if line.startswith("-- "):
            ident = line[3:].strip()
            assert re.fullmatch(r"[0-9a-f]{32}", ident), line
            assert ident not in entries, f"{ident} twice"
            current = entries[ident] = {}
            in_header = True
        elif current is not None and in_header:
            if not line.strip():
                in_header = False
                continue
            key, sep, value = line.partition(": ")
            assert sep, f"header line without 'Key: value' in {ident}: {line!r}"
            current[key] = value
    return entries


def test_journal_catalog_covers_every_message_id(tmp_path: Path) -> None:
    catalog = REPO / "packaging" / "aqtune.catalog"
    entries = catalog_entries(catalog.read_text(encoding="utf-8"))
    assert set(MESSAGE_IDS.values()) <= set(entries), set(MESSAGE_IDS.values()) - set(entries)
    for ident in MESSAGE_IDS.values():
        assert entries[ident].get("Subject") and entries[ident].get("Defined-By") == "aqtune", entries[ident]
    # systemd's own parser agrees: build a catalog database in a scratch root and list it.
    root = tmp_path / "root"
    (root / "usr/lib/systemd/catalog").mkdir(parents=True)
    (root / "usr/lib/systemd/catalog/aqtune.catalog").write_bytes(catalog.read_bytes())
    built = subprocess.run([journald.JOURNALCTL, f"--root={root}", "--update-catalog"], capture_output=True, text=True,
                           timeout=20)
    assert built.returncode == 0 and not built.stderr, built.stderr
    listed = subprocess.run([journald.JOURNALCTL, f"--root={root}", "--list-catalog"], capture_output=True, text=True,
                            timeout=20)
    assert listed.returncode == 0, listed.stderr
    ids = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    assert ids == set(entries)


# --- last: the rate limit lets an entry through a minute later, with the count it swallowed --------------


def late_entries(run: RateRun) -> list[dict[str, Any]]:
    """The drop entries up to the first one the rate limit let through a minute after the first ones.

    Done once per run and kept: the two tests after this need the same minute to pass.
    """
    if "late" in run.seen:
        late: list[dict[str, Any]] = run.seen["late"]
        return late
    first = run.journal.wait_for(f"MESSAGE_ID={DROPS_ID}", count=RATE_PER_MINUTE, alive=run.daemon.alive)
    # Read within the first minute (by the first rate test, or now when this runs alone): the entry a
    # minute later reports these, not what later episodes of the same sweep add after it.
    run.seen.setdefault("swallowed", wait_until(
        lambda: (d := read_state(run.state)) and d["daemon"]["journal_suppressed"], "suppressed episodes", timeout=10))
    run.seen["metrics"] = [suppressed_metric(run.metrics)]
    # Fresh drops once the minute since the first entries has passed; the earlier floods' retransmits
    # may or may not fall there.
    while time.time() < realtime(first[0]) + 60.5:
        time.sleep(0.5)
        run.seen["metrics"].append(suppressed_metric(run.metrics))
    run.ns.flood([(flood_target(listener), 10) for listener in run.listeners], hold=30)
    run.seen["late"] = run.journal.wait_for(f"MESSAGE_ID={DROPS_ID}", count=RATE_PER_MINUTE + 1,
                                            alive=run.daemon.alive, timeout=20)
    wait_for_state(run.state, run.daemon, after=realtime(run.seen["late"][RATE_PER_MINUTE]))
    run.seen["metrics"].append(suppressed_metric(run.metrics))
    return late_entries(run)


def test_rate_limit_reports_the_suppressed_count_a_minute_later(rate_run: RateRun) -> None:
    entries = late_entries(rate_run)
    opened, late = realtime(entries[0]), entries[RATE_PER_MINUTE]
    assert realtime(late) >= opened + 60
    suppressed = field_int(late, "AQTUNE_SUPPRESSED")
    assert suppressed >= rate_run.seen["swallowed"] >= 2
    assert late["MESSAGE"].endswith(f"({suppressed} entries suppressed by the rate limit before this one)")
    # Never more than max_per_minute entries in any minute.
    times = sorted(realtime(e) for e in entries)
    for start in times:
        assert sum(start <= t < start + 60 for t in times) <= RATE_PER_MINUTE, times


def test_journal_suppressed_total_never_decreases(rate_run: RateRun) -> None:
    late_entries(rate_run)
    values = rate_run.seen["metrics"]
    assert values[-1] >= max(values), values

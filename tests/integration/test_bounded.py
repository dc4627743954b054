"""Work bounded whatever a local user creates: namespaces by the hundred, listeners by the thousand, a long
command line (issue 12, finding 2).

An unprivileged user (``nobody``) makes NAMESPACES user+network namespaces with ``unshare``, each held by a
sleeping process, and LISTENERS listeners in one more, held by processes with a PAD-byte command line. The
real daemon watches every namespace with a small watchdog and small [limits]; the test reads what systemd
would (NOTIFY_SOCKET) and the state file. Then the Sweeper alone, in-process, on a few real namespaces:
what a sweep the budget cut short carries forward, which namespaces it reads next, and how the listener
budget takes turns.

Nothing is timed except the gaps between watchdog pings, which systemd enforces: a gap as long as the
watchdog's period is a restart.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aqtune.collect import netns as aq_netns
from aqtune.collect import procfs
from aqtune.collect.sweep import MIN_VISITS, SweepBudget, Sweeper
from aqtune.model.history import Model
from aqtune.surfaces.daemon import CHEAP_COUNTERS, CounterWatch
from aqtune.surfaces.publish import CMDLINE_SHOWN
from tests.helpers.aqtune_run import write_policy
from tests.helpers.namespace import HELPERS, PYTHON, TestNamespace, user_group, wait_until
from tests.helpers.notify import NotifyListener
from tests.helpers.service import ServiceDaemon, read_state

pytestmark = pytest.mark.integration

USER = "nobody"
NAMESPACES = 400
LISTENERS = 3000
FILLED = 20  # listeners with one connection queued: worst first, so the state file lists them
PAD = 200_000  # bytes of command line
WATCHDOG_USEC = 1_000_000
PER_SWEEP = 40  # [limits] namespaces
TRACKED = 1500  # [limits] listeners
PUBLISHED = 200  # [limits] published_listeners
START_TIMEOUT = 60.0
VISIT_TIMEOUT = 90.0  # for every namespace to be read once: NAMESPACES / PER_SWEEP sweeps and more
CROWD_LIFE = 600


def as_user(*command: str) -> list[str]:
    return ["setpriv", f"--reuid={USER}", f"--regid={user_group(USER)}", "--clear-groups", *command]


def user_namespaces_reason() -> str | None:
    """Why this host cannot run the test, or None."""
    for tool in ("setpriv", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is needed to create namespaces as {USER}"
    done = subprocess.run(as_user("unshare", "-rn", "true"), capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        return f"unprivileged user namespaces are disabled here ({done.stderr.strip()}): no user can create them"
    return None


@dataclass
class Crowd:
    namespace_pids: list[int]  # one sleeping process per namespace: the namespace is "pid:N"
    listener_pid: int  # the lowest pid in the listeners' namespace, which names it
    processes: list[subprocess.Popen[str]]


def _ready(process: subprocess.Popen[str], what: str) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("READY "):
        process.wait(timeout=10)
        raise AssertionError(f"{what} did not start (exit {process.returncode}): {line!r}")
    payload: dict[str, Any] = json.loads(line[len("READY "):])
    return payload


@pytest.fixture(scope="module")
def crowd() -> Iterator[Crowd]:
    """The user's namespaces and listeners; every process is gone after the module (stdin closed, then
    killed: the helpers' children die with them)."""
    reason = user_namespaces_reason()
    if reason is not None:
        pytest.skip(reason)
    crowd_py = str(HELPERS / "crowd.py")
    processes: list[subprocess.Popen[str]] = []
    try:
        spaces = subprocess.Popen(as_user(PYTHON, crowd_py, "namespaces", str(NAMESPACES), "--life", str(CROWD_LIFE)),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        processes.append(spaces)
        script = (f"ip link set lo up && exec {PYTHON} {crowd_py} listeners {LISTENERS} --fill {FILLED} "
                  f"--pad {PAD} --life {CROWD_LIFE}")
        holders = subprocess.Popen(as_user("unshare", "-rn", "sh", "-c", script),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        processes.append(holders)
        pids = _ready(spaces, "the namespace helper")["pids"]
        listener_pid = _ready(holders, "the listener helper")["pid"]
        yield Crowd(pids, listener_pid, processes)
    finally:
        for process in processes:
            with contextlib.suppress(BrokenPipeError):
                if process.stdin is not None:
                    process.stdin.close()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()


def policy_text() -> str:
    return f"""\
mode = "recommend"
interval = 0.5

[saturation]
sustain = 1

[limits]
sweep_seconds = 0.05
namespaces = {PER_SWEEP}
listeners = {TRACKED}
published_listeners = {PUBLISHED}

[metrics]
textfile = ""
"""


@dataclass
class Seen:
    """What the state documents showed while the test watched."""

    fresh: set[str]  # namespaces read (not stale) in some sweep
    partial: list[dict[str, Any]]  # "sweep" objects of documents of partial sweeps
    last: dict[str, Any]


def watch_documents(state: Path, daemon: ServiceDaemon, wanted: set[str], timeout: float) -> Seen:
    """Read the state file as the daemon rewrites it until every ``wanted`` namespace was read once."""
    seen = Seen(set(), [], {})
    taken = 0.0

    def progress() -> bool:
        nonlocal taken
        document = read_state(state)
        if document is None or document["taken_at"] == taken:
            return False
        taken = document["taken_at"]
        seen.last = document
        seen.fresh |= {ns["name"] for ns in document["namespaces"] if not ns["stale"]}
        if document["sweep"]["partial"]:
            seen.partial.append(document["sweep"])
        assert daemon.alive() is None, daemon.alive()
        return wanted <= seen.fresh

    wait_until(progress, f"every one of {len(wanted)} namespaces read once", timeout=timeout, interval=0.01)
    return seen


def test_the_daemon_stays_bounded_and_answers_its_watchdog(crowd: Crowd, tmp_path: Path) -> None:
    state = tmp_path / "state"
    notify = NotifyListener(tmp_path / "notify")
    policy = write_policy(tmp_path / "policy.toml", policy_text())
    daemon = ServiceDaemon(["--config", str(policy), "--state-dir", str(state), "--dry-run", "--no-ebpf"],
                           tmp_path / "daemon.log",
                           env={"AQTUNE_LOG": "console", "NOTIFY_SOCKET": str(notify.path),
                                "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    try:
        wait_until(lambda: notify.with_line("READY=1") or daemon.alive(), "READY=1", timeout=START_TIMEOUT)
        assert daemon.alive() is None, daemon.alive()
        wanted = {f"pid:{pid}" for pid in crowd.namespace_pids} | {f"pid:{crowd.listener_pid}"}
        # Every namespace is read, NAMESPACES of them PER_SWEEP at a time: the sweeps are partial until then.
        seen = watch_documents(state, daemon, wanted, VISIT_TIMEOUT)
        messages = notify.received()
    finally:
        daemon.stop()
        notify.close()
    assert daemon.popen.returncode == 0, "\n".join(daemon.lines())
    assert not [line for line in daemon.lines() if "Traceback" in line], "\n".join(daemon.lines())

    # Partial sweeps said so, with what they left for the next one, in the state and in STATUS.
    assert seen.partial and all(sweep["skipped_namespaces"] > 0 for sweep in seen.partial), seen.partial
    statuses = [m.value("STATUS") or "" for m in messages if m.value("STATUS") is not None]
    partial = [s for s in statuses if re.search(r"; partial sweep: \d+ namespaces left for the next sweep", s)]
    assert partial, statuses[-5:]
    assert any("listeners over the limit, sampled round-robin" in s for s in statuses), statuses[-5:]

    # Pings every half period while sweeps were partial, never a gap systemd would restart it for.
    pings = [m.at for m in messages if m.has("WATCHDOG=1")]
    assert len(pings) >= 10, pings
    gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
    assert max(gaps) < WATCHDOG_USEC / 1e6, [round(gap, 3) for gap in sorted(gaps)[-5:]]

    # What is tracked and published is capped, and what was left out is counted.
    document = seen.last
    assert document["sweep"]["skipped_listeners"] >= LISTENERS - TRACKED
    assert len(document["listeners"]) == PUBLISHED
    assert document["left_out"]["listeners"] > 0
    size = os.path.getsize(state / "status.json")
    assert size < 4096 * PUBLISHED + 1000 * len(document["namespaces"]), size
    # The user's queued listeners are the worst and listed, with their command line cut short.
    theirs = [l for l in document["listeners"] if l["netns"] == f"pid:{crowd.listener_pid}"]
    assert len(theirs) >= FILLED, [(l["netns"], l["fill"]) for l in document["listeners"][:30]]
    cmdlines = [p["cmdline"] for l in document["listeners"] for p in l["processes"]]
    assert max(len(c) for c in cmdlines) <= CMDLINE_SHOWN
    assert any(p["cmdline"].endswith("\u2026") for l in theirs for p in l["processes"]), theirs[0]


def test_a_users_namespaces_do_not_delay_the_first_read_of_a_service_namespace(crowd: Crowd) -> None:
    """The user's NAMESPACES namespaces are read PER_SWEEP a sweep. A service that root starts meanwhile
    in a new network namespace (found by its pid, as the user's are, and listed after them) is read in
    the next sweep, not after all of the user's: under the CPU budget those take a minute or more."""
    clock = Clock()
    sweeper = Sweeper(SweepBudget(seconds=60.0, namespaces=PER_SWEEP), clock=clock)
    sweeper.sweep("all")
    listen = "import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 8080)); s.listen(); time.sleep(600)"
    service = subprocess.Popen(["unshare", "-n", PYTHON, "-c", listen], stdin=subprocess.DEVNULL)
    try:
        host = os.stat("/proc/self/ns/net").st_ino
        inode = wait_until(lambda: (ino := os.stat(f"/proc/{service.pid}/ns/net").st_ino) != host and ino,
                           "the service's own network namespace", timeout=10)
        # Listening (state 0A on port 8080), as seen from inside its namespace.
        wait_until(lambda: ":1F90 00000000:0000 0A" in Path(f"/proc/{service.pid}/net/tcp").read_text(),
                   "the service listening", timeout=10)
        clock.now += 1
        snapshot = sweeper.sweep("all")
    finally:
        service.kill()
        service.wait(timeout=10)
    # Most of the user's are still unread: without the order, the service would wait behind them.
    users = {f"pid:{pid}" for pid in crowd.namespace_pids}
    assert len(users - {ns.name for ns in snapshot.namespaces}) > PER_SWEEP
    (name,) = [ns.name for ns in snapshot.namespaces if ns.inode == inode and not ns.stale] or [None]
    assert name is not None, sorted(ns.name for ns in snapshot.namespaces if not ns.stale)
    assert [l.port for l in snapshot.listeners if l.netns == name] == [8080]


# --- the Sweeper alone, on a few real namespaces --------------------------------------------------------


@pytest.fixture
def only(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[TestNamespace]], None]:
    """Limit the namespaces a sweep finds to the test's own (the real list, filtered: other tests' come
    and go on this host, and the budget's order depends on what exists)."""
    real = aq_netns.list_namespaces

    def limit(spaces: list[TestNamespace]) -> None:
        names = {ns.name for ns in spaces}
        monkeypatch.setattr(aq_netns, "list_namespaces",
                            lambda *a, **k: [ref for ref in real(*a, **k) if ref.name in names])
    return limit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_cut_sweep_carries_the_rest_forward_and_reads_it_next(
        netns: Callable[[], TestNamespace], only: Callable[[list[TestNamespace]], None]) -> None:
    spaces = [netns() for _ in range(4)]
    for ns in spaces:
        ns.listen("tcp4:4")
    only(spaces)
    names = [ns.name for ns in spaces]
    clock = Clock()
    sweeper = Sweeper(SweepBudget(seconds=60, namespaces=2, listeners=100), clock=clock)
    model = Model()
    read: list[list[str]] = []
    for _ in range(4):
        clock.now += 1
        snapshot = sweeper.sweep("all")
        model.update(snapshot, {})
        read.append(sorted(ns.name for ns in snapshot.namespaces if not ns.stale))
        if len(read) == 1:
            # Never read: nothing stands in for them yet, and the sweep says what it left.
            assert (snapshot.partial, snapshot.skipped_namespaces) == (True, 2)
            assert len(snapshot.namespaces) == 2
        else:
            stale = sorted(ns.name for ns in snapshot.namespaces if ns.stale)
            assert sorted(read[-1] + stale) == names and len(stale) == 2
            # The rows of a namespace not read this time stand in, so the model keeps its history.
            assert {l.netns for l in snapshot.listeners} == set(names)
            assert {key[0] for key in model.listeners} == set(names)
    # Two at a time, the ones read longest ago first: every namespace in every second sweep.
    assert read[0] != read[1] and sorted(read[0] + read[1]) == names
    assert read[2] == read[0] and read[3] == read[1]


def test_a_sweep_out_of_time_is_cut_between_namespaces(
        netns: Callable[[], TestNamespace], only: Callable[[list[TestNamespace]], None]) -> None:
    spaces = [netns() for _ in range(5)]
    for ns in spaces:
        ns.listen("tcp4:4")  # not idle: due in every sweep
    only(spaces)
    clock = Clock()
    fed: list[int] = []
    # No time at all: each sweep still reads MIN_VISITS namespaces (progress), feeding the watchdog before each.
    sweeper = Sweeper(SweepBudget(seconds=0.0), progress=lambda: fed.append(1), clock=clock)
    reads: list[set[str]] = []
    for _ in range(3):
        clock.now += 1
        snapshot = sweeper.sweep("all")
        reads.append({ns.name for ns in snapshot.namespaces if not ns.stale})
        assert len(reads[-1]) == MIN_VISITS and snapshot.partial
    assert set().union(*reads) == {ns.name for ns in spaces}
    assert len(fed) >= 3 * MIN_VISITS


def test_a_namespace_without_listeners_costs_a_look_until_one_appears(
        netns: Callable[[], TestNamespace], only: Callable[[list[TestNamespace]], None]) -> None:
    busy, idle = netns(), netns()
    busy.listen("tcp4:4")
    only([busy, idle])
    clock = Clock()
    sweeper = Sweeper(clock=clock)
    first = sweeper.sweep("all")
    assert {ns.name for ns in first.namespaces} == {busy.name, idle.name}
    # Still no socket there: looked at (a socket count), not read again nor listed.
    for _ in range(2):
        clock.now += 1
        later = sweeper.sweep("all")
        assert [ns.name for ns in later.namespaces] == [busy.name]
        assert (later.idle_namespaces, later.partial) == (1, False)
    # Watched between sweeps: only where listeners are.
    assert [ref.name for ref in sweeper.watched()] == [busy.name]
    # A listener there shows at the next sweep.
    (listener,) = idle.listen("tcp4:4").ready()["listeners"]
    clock.now += 1
    found = sweeper.sweep("all")
    assert {ns.name for ns in found.namespaces if not ns.stale} == {busy.name, idle.name}
    assert listener["cookie"] in {l.cookie for l in found.listeners}


def test_listeners_over_the_budget_take_turns_and_queued_ones_stay(
        netns: Callable[[], TestNamespace], only: Callable[[list[TestNamespace]], None]) -> None:
    ns = netns()
    helper = ns.listen(*["tcp4:8"] * 30, user=USER)
    listeners = helper.ready()["listeners"]
    queued = listeners[0]
    ns.flood([(f"tcp:{queued['address']}", 1)], hold=60)
    wait_until(lambda: ns.ss_tcp()[queued["address"]].queue == 1, "one connection queued")
    only([ns])
    sweeper = Sweeper(SweepBudget(listeners=10))
    seen: set[int] = set()
    for _ in range(4):
        snapshot = sweeper.sweep("all")
        cookies = {l.cookie for l in snapshot.listeners}
        assert len(cookies) == 10 and snapshot.skipped_listeners == 20
        assert queued["cookie"] in cookies
        seen |= cookies
    assert seen == {l["cookie"] for l in listeners}


def test_a_command_line_is_read_only_so_far() -> None:
    padding = "x" * 100_000  # one argument: at most 128 KiB each
    process = subprocess.Popen([PYTHON, "-c", "import sys; sys.stdin.read()", padding], stdin=subprocess.PIPE)
    try:
        wait_until(lambda: len(Path(f"/proc/{process.pid}/cmdline").read_bytes()) > 100_000, "the long command line")
        described = procfs.describe_process(process.pid)
        assert described is not None
        assert described.cmdline.startswith(f"{PYTHON} -c import sys")
        assert len(described.cmdline.encode()) <= procfs.CMDLINE_MAX + len(procfs.TRUNCATED)
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=10)


def test_moving_counters_bring_a_sweep_of_just_their_namespace(
        netns: Callable[[], TestNamespace], tmp_path: Path) -> None:
    """Between two sweeps a long interval apart, drops in one namespace bring a sweep of that namespace
    forward; the others stand in from the last sweep (stale), so the early sweep costs one namespace."""
    flooded, quiet = netns(), netns()
    (target,) = flooded.listen("tcp4:2").ready()["listeners"]
    (other,) = quiet.listen("tcp4:2").ready()["listeners"]
    state = tmp_path / "state"
    policy = write_policy(tmp_path / "policy.toml", 'interval = 30\n[saturation]\nsustain = 60\n')
    daemon = ServiceDaemon(["--config", str(policy), "--state-dir", str(state), "--dry-run", "--no-ebpf"],
                           tmp_path / "daemon.log", env={"AQTUNE_LOG": "console"})
    try:
        first = wait_until(lambda: read_state(state) or daemon.alive(), "the first sweep", timeout=START_TIMEOUT)
        assert isinstance(first, dict), first
        # The listen(2) queue holds 3; the rest of the SYNs are dropped, and dropped again as they are resent.
        flooded.flood([(f"tcp:{target['address']}", 12)], hold=60)

        def early() -> dict[str, Any] | None:
            document = read_state(state)
            assert daemon.alive() is None, daemon.alive()
            if document is None or document["taken_at"] == first["taken_at"]:
                return None
            fresh = {ns["name"]: not ns["stale"] for ns in document["namespaces"]}
            return document if fresh.get(flooded.name) and fresh.get(quiet.name) is False else None

        document = wait_until(early, "a sweep of the flooded namespace alone", timeout=20)
    finally:
        daemon.stop()
    shown = {(l["netns"], l["address"]): l for l in document["listeners"]}
    assert shown[(flooded.name, target["address"])]["queue"] == 3
    assert shown[(flooded.name, target["address"])]["stale"] is False
    assert shown[(quiet.name, other["address"])]["stale"] is True
    assert document["sweep"]["partial"] is False


def test_a_daemon_watching_one_named_namespace_does_not_walk_every_process(
        netns: Callable[[], TestNamespace]) -> None:
    """`--netns NAME` (or host) is found without reading every process's ns link, a walk that grows
    with the host's processes and ran every sweep; `all` and a namespace pinned by identity still walk."""
    named = netns()
    held = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        host = aq_netns.list_namespaces(processes=False)[0].inode  # PID 1's, or ours where PID 1's is hidden
        inode = wait_until(lambda: (found := aq_netns._ns_inode_of_link(f"/proc/{held.pid}/ns/net")) != host and found,
                           "the unshared namespace")
        everything = aq_netns.list_namespaces()
        by_name = aq_netns.list_namespaces(processes=False)
        assert [ref.inode for ref in by_name] == [ref.inode for ref in everything if not ref.path.startswith("/proc/")
                                                  or ref.name == "host"]
        assert inode in {ref.inode for ref in everything} and inode not in {ref.inode for ref in by_name}
        assert named.name in {ref.name for ref in by_name}
        for wanted, walks in ((named.name, False), ("host", False), ("all", True), (f"pid:{held.pid}", True)):
            assert aq_netns.resolve_selection(wanted).by_processes is walks, wanted
        sweeper = Sweeper()
        assert {ns.name for ns in sweeper.sweep(aq_netns.resolve_selection(named.name), owner_cache=None).namespaces} \
            == {named.name}
    finally:
        held.kill()
        held.wait()


def test_a_quiet_dump_is_decoded_once_and_a_moved_queue_still_shows(netns: Callable[[], TestNamespace]) -> None:
    """The daemon reuses what a reply chunk decoded to while its bytes stay the same: its sweeps equal
    uncached ones, a queue that moves shows at the next sweep, and a chunk is reused only where the
    listeners in it did not move."""
    ns = netns()
    specs = [f"tcp4:{8 + n % 3}" for n in range(400)] + ["tcp6:4", "unix:3:" + ns.unix_path("s")]
    listeners = ns.listen(*specs).ready()["listeners"]
    select = aq_netns.resolve_selection(ns.name)

    def figures(sweeper: Sweeper) -> dict[int, tuple[str, str, int, int, int | None, int]]:
        snapshot = sweeper.sweep(select, owner_cache=None)
        return {l.cookie: (l.netns, l.address, l.queue, l.backlog, l.drops, l.inode) for l in snapshot.listeners}

    cached = Sweeper()
    first = figures(cached)
    assert len(first) == len(specs) and not cached.chunks.previous
    assert figures(cached) == first == figures(Sweeper())
    reused = len(cached.chunks.previous)
    assert reused >= 3, "400 listeners come in several chunks"
    target = next(l for l in listeners if l["address"].startswith("127.0.0.1:"))
    ns.flood([(f"tcp:{target['address']}", 2)], hold=30)
    moved = wait_until(lambda: (now := figures(cached))[target["cookie"]][2] == 2 and now, "the queue of 2 in a sweep")
    assert moved == figures(Sweeper())
    assert {cookie: row for cookie, row in moved.items() if row != first[cookie]} == {
        target["cookie"]: (*first[target["cookie"]][:2], 2, *first[target["cookie"]][3:])}


def test_the_cheap_check_reads_kept_counter_files_of_the_right_namespaces(netns: Callable[[], TestNamespace]) -> None:
    """Where few namespaces are watched, each one's /proc/net/netstat stays open and is read from the
    daemon's own namespace: the drops of one namespace move its counters alone. Files are closed as
    soon as their namespace is no longer watched, and past ``per_check`` none is kept."""
    flooded, quiet = netns(), netns()
    (target,) = flooded.listen("tcp4:1").ready()["listeners"]
    quiet.listen("tcp4:1").ready()
    refs = [ref for ref in aq_netns.list_namespaces(processes=False) if ref.name in (flooded.name, quiet.name)]
    assert len(refs) == 2
    watch = CounterWatch(per_check=4)
    watch.watch(refs, {})
    assert watch.moved() == set() and watch.files.keys() == set(refs)
    kept = dict(watch.files)
    flooded.flood([(f"tcp:{target['address']}", 8)], hold=30)
    moved = wait_until(lambda: watch.moved(), "the flooded namespace's counters to move", timeout=10)
    assert {ref.name for ref in moved} == {flooded.name}
    assert watch.files == kept, "read through the files kept open"
    # What the kept files read is each namespace's own (nstat in it; the flooded one's SYNs are resent,
    # so its counters can only have grown since).
    seen = {ref.name: dict(zip(CHEAP_COUNTERS, watch.values[ref], strict=True)) for ref in refs}
    for ns, exact in ((quiet, True), (flooded, False)):
        now = {name: ns.nstat().get(f"TcpExt{name}", 0) for name in CHEAP_COUNTERS}
        assert all(seen[ns.name][name] == now[name] if exact else 0 < seen[ns.name][name] <= now[name]
                   for name in ("ListenOverflows", "ListenDrops")), (ns.name, seen, now)
    watch.watch(refs[:1], {})
    assert watch.files.keys() == {refs[0]}
    for fd in kept.values():
        if fd != watch.files[refs[0]]:
            with pytest.raises(OSError):
                os.fstat(fd)
    crowded = CounterWatch(per_check=1)
    crowded.watch(refs, {})
    crowded.moved()
    assert not crowded.files
    watch.close()
    assert not watch.files

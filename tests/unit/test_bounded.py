"""The pure parts of bounded work: which namespaces a sweep reads, which listeners it tracks, what the
state file lists, and the cheap counter check's turns (the real sweeps are in
tests/integration/test_bounded.py)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from aqtune.act.ledger import Ledger
from aqtune.act.log import EventLog
from aqtune.act.report import MAX_PEERS, MAX_PEERS_TOTAL, DegradedReporter, DropReporter
from aqtune.act.throttle import PRUNE_AT, Budget, Throttle
from aqtune.collect.netlink import MAX_REST, ChunkCache, _Decoded
from aqtune.collect.netns import NamespaceRef
from aqtune.collect.sweep import (
    IDLE_PER_SWEEP,
    IDLE_REVISIT,
    Kept,
    SweepBudget,
    Visit,
    has_sockets,
    parse_protocols,
    plan_visits,
    select_listeners,
)
from aqtune.decide.policy import MetricsPolicy, Policy, PolicyError, WorkLimits, parse
from aqtune.decide.tick import decide
from aqtune.model.history import Model
from aqtune.records import Listener, ListenerEvents, Namespace, Process, Snapshot
from aqtune.surfaces import run
from aqtune.surfaces.daemon import CHECK_EVERY, QUIET_PERIOD, CounterWatch, Notifier, Wakeup, budget, sweep_gap, wake_at
from aqtune.surfaces.publish import (
    CMDLINE_SHOWN,
    PUBLISH_EVERY,
    DaemonFacts,
    Publisher,
    published,
    shown_namespaces,
    truncated,
)
from aqtune.surfaces.status import render

PROTOCOLS = """\
protocol  size sockets  memory press maxhdr  slab module     cl co di ac io in de sh ss gs se re bi br ha uh gp em
PACKET    1600      0      -1   NI       0   no   kernel      n  n  n  n  n  n  n  n  n  n  n  n  n  n  n  n  n  n
TCPv6     2432      3       0   no     192   yes  kernel      y  y  y  y  y  y  y  y  y  y  y  y  n  y  y  y  y  y
UNIX-STREAM 1152    0      -1   NI       0   yes  kernel      y  n  n  n  n  n  n  n  n  n  n  n  n  n  n  n  n  n
UNIX      1152      0      -1   NI       0   yes  kernel      y  n  n  n  n  n  n  n  n  n  n  n  n  n  n  n  n  n
TCP       2304      0       0   no     192   yes  kernel      y  y  y  y  y  y  y  y  y  y  y  y  n  y  y  y  y  y
"""
TCP, UNIX = ("TCP", "TCPv6"), ("UNIX", "UNIX-STREAM")


def test_protocol_counts_say_which_dumps_can_find_anything() -> None:
    counts = parse_protocols(PROTOCOLS)
    assert counts == {"PACKET": 0, "TCPv6": 3, "UNIX-STREAM": 0, "UNIX": 0, "TCP": 0}
    assert has_sockets(counts, TCP) and not has_sockets(counts, UNIX)
    assert has_sockets({"UNIX": 0, "UNIX-STREAM": 1}, UNIX)  # a stream socket, counted apart since 5.15
    # Unknown is "maybe": the dump runs.
    assert has_sockets(None, TCP) and has_sockets({}, TCP) and has_sockets({"PACKET": 0}, UNIX)


def ref(name: str, inode: int) -> NamespaceRef:
    return NamespaceRef(name, inode, f"/proc/{inode}/ns/net")


def visit(name: str, at: float, listeners: int = 1, error: str | None = None) -> Visit:
    return Visit(Namespace(name, 0, listeners=listeners, error=error), [], at)


def test_plan_reads_the_host_then_the_never_read_then_the_longest_unread() -> None:
    host, a, b, c, d = ref("host", 1), ref("pid:2", 2), ref("pid:3", 3), ref("pid:4", 4), ref("pid:5", 5)
    visits = {a: visit("pid:2", 50.0), b: visit("pid:3", 10.0), host: visit("host", 90.0)}
    assert plan_visits([a, b, c, host, d], visits, 100.0) == [host, c, d, b, a]
    assert plan_visits([a, b, c, host], visits, 100.0, focus={a, c}) == [c, a]


def test_plan_reads_a_never_read_namespace_of_the_host_before_never_read_ones_of_users() -> None:
    """A user's thousands of `unshare -rn` namespaces must not delay the first read of a service's
    namespace; once read, every namespace takes its turn by age, whoever owns it."""
    host, read = ref("host", 1), ref("pid:2", 2)
    users = [NamespaceRef(f"pid:{n}", n, f"/proc/{n}/ns/net", user_owned=True, owner_uid=65534) for n in (3, 4)]
    service = ref("pid:9", 9)  # started after the user's: listed after them
    visits = {read: visit("pid:2", 10.0), host: visit("host", 90.0)}
    assert plan_visits([host, read, *users, service], visits, 100.0) == [host, service, *users, read]
    visits |= {users[0]: visit("pid:3", 5.0), service: visit("pid:9", 50.0)}
    assert plan_visits([host, read, *users, service], visits, 100.0) == [host, users[1], users[0], read, service]


def test_namespaces_without_listeners_are_looked_at_in_turn_and_now_and_then() -> None:
    idle = [ref(f"pid:{n}", n) for n in range(10, 110)]
    failed, busy = ref("pid:3", 3), ref("pid:4", 4)
    now = 1000.0
    visits = {r: visit(r.name, now - 1 - r.inode / 1000, listeners=0) for r in idle}
    visits[failed] = visit("pid:3", now - 1, listeners=0, error="EPERM")
    visits[busy] = visit("pid:4", now - 1)
    due = plan_visits([*idle, failed, busy], visits, now)
    # Namespaces with listeners (or errors) are always due; of the idle ones, the longest unchecked.
    assert {failed, busy} <= set(due) and len(due) == 2 + IDLE_PER_SWEEP
    assert set(due) - {failed, busy} == set(idle[-IDLE_PER_SWEEP:])
    # One unchecked for IDLE_REVISIT is due whatever its turn.
    visits[idle[0]].at = now - IDLE_REVISIT
    assert idle[0] in plan_visits([*idle, failed, busy], visits, now)
    # A host with a few namespaces looks at each of them every sweep.
    assert plan_visits(idle[:3], visits, now) == sorted(idle[:3], key=lambda r: visits[r].at)


def row(cookie: int, uid: int | None = 1000, queue: int = 0) -> Listener:
    return Listener("pid:9", "tcp", f"127.0.0.1:{cookie}", cookie, queue, 16, 0, cookie, cookie, uid)


def test_the_listener_budget_keeps_queues_then_services_then_takes_turns() -> None:
    rows = [row(cookie) for cookie in range(1, 21)]
    assert select_listeners(rows, 20, -1) == (rows, -1)
    service, queued = row(100, uid=0), row(101, queue=3)
    seen: set[int] = set()
    cursor = -1
    for _ in range(5):
        kept, cursor = select_listeners([*rows, service, queued], 6, cursor)
        cookies = {listener.cookie for listener in kept}
        assert len(kept) == 6 and {100, 101} <= cookies
        seen |= cookies
    # Four at a time in turn, wrapping around: all twenty within five sweeps.
    assert seen == {listener.cookie for listener in rows} | {100, 101}
    # The order of ranks: a service's queue, a user's queue, a quiet service, a quiet user's listener.
    ranked = [row(1, uid=0, queue=1), row(2, queue=1), row(3, uid=None), row(4)]
    assert [r.cookie for r in select_listeners(ranked[::-1], 3, -1)[0]] == [1, 2, 3]
    # More queued users' listeners than room: a service in trouble is still kept, then users' by turns.
    crowd = [row(cookie, queue=1) for cookie in range(10)]
    kept, _ = select_listeners([*crowd, row(50, uid=0, queue=1), row(51, uid=0)], 4, -1)
    assert [listener.cookie for listener in kept] == [50, 0, 1, 2]


def test_the_cheap_check_reads_the_host_every_time_and_the_rest_in_turn() -> None:
    host = ref("host", 1)
    others = [ref(f"pid:{n}", n) for n in range(2, 12)]
    watch = CounterWatch(per_check=4)
    watch.watch([host, *others], {host: {"ListenDrops": 1}, others[0]: {}})
    assert watch.values.keys() == {host, others[0]}
    batches = [watch.batch() for _ in range(4)]
    assert all(len(batch) == 4 and batch[0] == host for batch in batches)
    assert {r for batch in batches for r in batch} == {host, *others}
    watch.watch([host], {})
    assert watch.values.keys() == {host} and watch.batch() == [host]


def test_published_state_is_capped_worst_first() -> None:
    listeners = [row(cookie, queue=cookie % 7) for cookie in range(1, 101)]
    namespaces = [Namespace(f"pid:{n}", n, listeners=n % 2) for n in range(2, 30)] + [Namespace("host", 1)]
    snapshot = Snapshot(0.0, 0.0, namespaces, listeners)
    shown = published(snapshot, 10, advised={"pid:3"})
    assert [l.queue for l in shown.listeners] == [6] * 10
    assert shown.namespaces == namespaces  # within PUBLISHED_NAMESPACES
    few = shown_namespaces(namespaces, 5, advised={"pid:4"})
    # The host, the advised, then those with listeners, in the sweep's order.
    assert [ns.name for ns in few] == ["pid:3", "pid:4", "pid:5", "pid:7", "host"]


def test_command_lines_are_cut() -> None:
    assert truncated("nginx -g daemon off;") == "nginx -g daemon off;"
    cut = truncated("x" * 1_000_000)
    assert len(cut) == CMDLINE_SHOWN and cut.endswith("\u2026")


def silent_publisher(state_dir: str | None = None) -> Publisher:
    class Silent:
        def info(self, *_args: Any, **_kwargs: Any) -> None:
            pass

        warning = error = info

    return Publisher(state_dir, DegradedReporter(EventLog(Silent())))


def test_drops_in_the_last_minute_count_each_namespace_s_own_increase() -> None:
    publisher = silent_publisher()

    def at(when: float, **drops: int) -> int:
        namespaces = [Namespace(name, 0, counters={"ListenDrops": value}) for name, value in drops.items()]
        return publisher.drops_last_minute(Snapshot(when, 0.0, namespaces, []))

    assert at(0.0, host=10, a=500) == 0
    assert at(1.0, host=12) == 2  # "a" not read this time: its 500 are not news
    assert at(2.0, host=12, a=503, b=900) == 2  # a is back (no baseline), b is new
    assert at(3.0, host=13, a=506, b=901) == 7
    assert at(70.0, host=13, a=506, b=901) == 0


def test_the_state_file_says_what_was_left_out(tmp_path: Path) -> None:
    long_command = Process(4242, "evil", "x" * 100_000, None)
    listeners = [Listener("pid:9", "tcp", f"127.0.0.1:{n}", n, n % 3, 16, 0, n, n, 1000, (long_command,))
                 for n in range(1, 51)]
    namespaces = [Namespace("host", 1, listeners=0), Namespace("pid:9", 9, listeners=50, stale=True, read_at=5.0)]
    snapshot = Snapshot(10.0, 0.1, namespaces, listeners, partial=True, skipped_namespaces=7, skipped_listeners=3,
                        idle_namespaces=2)
    policy = Policy(limits=WorkLimits(published_listeners=5), metrics=MetricsPolicy(textfile=""))
    model = Model()
    model.update(snapshot, {})
    decision = decide(snapshot, {}, model, policy, {})
    publisher = silent_publisher(str(tmp_path))
    publisher.publish(snapshot, decision, {}, {"active": False, "probes": {}, "mode": "off"}, policy,
                      DaemonFacts("dry-run", 0, 0, []))
    document = json.loads((tmp_path / "status.json").read_text(encoding="utf-8"))
    assert document["sweep"] == {"partial": True, "skipped_namespaces": 7, "skipped_listeners": 3,
                                 "idle_namespaces": 2, "stale_namespaces": 1}
    assert document["left_out"] == {"listeners": 45, "namespaces": 0}
    assert len(document["listeners"]) == 5 and all(l["stale"] and l["queue"] == 2 for l in document["listeners"])
    assert {len(p["cmdline"]) for l in document["listeners"] for p in l["processes"]} == {CMDLINE_SHOWN}
    assert [(ns["name"], ns["stale"], ns["read_at"]) for ns in document["namespaces"]] == [
        ("host", False, 0.0), ("pid:9", True, 5.0)]
    assert len((tmp_path / "status.json").read_bytes()) < 20_000
    text = render(document)
    assert "partial sweep: 7 namespaces left for the next sweep" in text
    assert "3 listeners over the [limits] listeners budget, watched in turn" in text
    assert "not listed: 45 listeners (the worst are), 0 namespaces" in text


class Recorded(run.Observer):
    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__("all")
        self.snapshot = snapshot

    def observe(self, policy: object = None, focus: object = None) -> run.Observation:
        return run.Observation(self.snapshot, {}, {})


def test_status_line_says_a_sweep_was_partial() -> None:
    listeners = [row(n) for n in range(1, 4)]
    snapshot = Snapshot(10.0, 0.1, [Namespace("pid:9", 9, listeners=30)], listeners, partial=True,
                        skipped_namespaces=12, skipped_listeners=27)
    policy = Policy(limits=WorkLimits(published_listeners=2), metrics=MetricsPolicy(textfile=""))
    with tempfile.TemporaryDirectory() as state:
        runner = run.Runner(policy, "all", Ledger(state), dry_run=True, log=silent_publisher().degraded.log)
        runner.observer = Recorded(snapshot)
        runner.tick()
    summary = runner.summary()
    assert summary.startswith("watching 3 listeners in 1 netns; ")
    assert summary.endswith("; partial sweep: 12 namespaces left for the next sweep; "
                            "27 listeners over the limit, sampled round-robin"), summary


def test_a_tick_feeds_the_watchdog_between_its_stages() -> None:
    """Not only between namespaces: one namespace under listener churn made sweeps of 0.2 s of CPU that
    waited for a CPU between stages on a saturated host, and the longest gap between pings reached
    1.75 s of the load benchmark's 2 s period."""
    snapshot = Snapshot(10.0, 0.1, [Namespace("pid:9", 9, listeners=1)], [row(1)])
    policy = Policy(metrics=MetricsPolicy(textfile=""))
    with tempfile.TemporaryDirectory() as state:
        runner = run.Runner(policy, "all", Ledger(state), dry_run=True, log=silent_publisher().degraded.log)
        runner.observer = Recorded(snapshot)
        fed: list[str] = []
        runner.observer.sweeper.progress = lambda: fed.append("ping")
        runner.tick()
    assert len(fed) >= 3  # after observing, after deciding, before publishing


def test_limits_are_policy_keys() -> None:
    policy = parse("[limits]\nsweep_seconds = 0.5\nnamespaces = 10\nlisteners = 100\npublished_listeners = 50\n")
    assert policy.limits == WorkLimits(0.5, 10, 100, 50)
    assert parse("").limits == WorkLimits()
    with pytest.raises(PolicyError, match=r"limits\.namespaces: must be in"):
        parse("[limits]\nnamespaces = 0\n")
    with pytest.raises(PolicyError, match=r"limits\.sweep_seconds: must be in"):
        parse("[limits]\nsweep_seconds = nan\n")


def test_throttles_and_budgets_forget_what_users_created_and_left() -> None:
    # One key per namespace name that ever erred (pid:N names churn), one source per listener that ever
    # dropped: both come and go with what users create.
    throttle: Throttle[str] = Throttle(300.0)
    budget: Budget[str] = Budget(per_minute=30, per_source=5)
    for step in range(20_000):
        now = step * 1.0
        assert throttle.due(f"netns pid:{step}", now)
        budget.allow([f"pid:{step} 127.0.0.1:80"], now)
        assert len(throttle.said) <= PRUNE_AT and len(budget.by_source) <= budget.per_minute + 1
    # What is still within its time is remembered.
    assert not throttle.due("netns pid:19999", 20_000.0)
    assert throttle.holds("netns pid:19800", 20_000.0)


def test_listeners_are_chosen_as_they_are_decoded_the_same_as_all_at_once() -> None:
    # A dump is handed over chunk by chunk; what is kept must not depend on the chunks, and never more
    # than the limit is held (a namespace of any size costs the budget's memory).
    rows = [row(cookie * 7919 % 1000, uid=(0 if cookie % 13 == 0 else 1000), queue=cookie % 5 == 0)
            for cookie in range(1000)]
    for cursor in (-1, 0, 500, 999):
        whole, whole_cursor = select_listeners(rows, 100, cursor)
        kept = Kept(100, cursor)
        for start in range(0, len(rows), 37):
            kept.offer(rows[start:start + 37])
            assert len(kept.result()[0]) <= 100
        chunked, chunked_cursor = kept.result()
        assert [r.cookie for r in chunked] == [r.cookie for r in whole] and chunked_cursor == whole_cursor
        # By rank, then the cookies just after the cursor.
        ranked = sorted(rows, key=lambda r: (2 * (not r.queue) + (r.uid != 0), (r.cookie - cursor - 1) % 2**64))
        assert [r.cookie for r in whole] == [r.cookie for r in ranked[:100]]
        assert whole_cursor == whole[-1].cookie


def test_peers_kept_between_sweeps_are_bounded_in_all() -> None:
    reporter = DropReporter(silent_publisher().degraded.log)
    for inode in range(100):
        for client in range(MAX_PEERS + 10):
            reporter.remember_peer(inode, f"10.0.{client // 256}.{client % 256}")
    assert all(len(peers) <= MAX_PEERS for peers in reporter.peers.values())
    assert sum(len(peers) for peers in reporter.peers.values()) == MAX_PEERS_TOTAL


def test_a_sweep_takes_at_most_a_quarter_of_the_watchdog_period(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    assert budget(WorkLimits(sweep_seconds=2.0, namespaces=7, listeners=9), Notifier()) == SweepBudget(0.25, 7, 9)
    assert budget(WorkLimits(sweep_seconds=0.1), Notifier()).seconds == 0.1
    monkeypatch.delenv("WATCHDOG_USEC")
    assert budget(WorkLimits(), Notifier()).seconds == WorkLimits().sweep_seconds


def test_the_daemons_cpu_is_bounded_by_the_policys_budget() -> None:
    """A sweep that cost c CPU seconds is followed by the next no sooner than c * 100 / max_cpu_percent
    seconds after it began: the daemon's share of one core stays within the budget under any load."""
    assert parse("[limits]\nmax_cpu_percent = 5\n").limits.max_cpu_percent == 5
    assert Policy().limits.max_cpu_percent == 5
    for wrong in ("0", "101", "nan", '"10"'):
        with pytest.raises(PolicyError, match=r"limits\.max_cpu_percent"):
            parse(f"[limits]\nmax_cpu_percent = {wrong}\n")
    assert sweep_gap(wall=0.2, cpu=0.135, max_cpu_percent=10) == pytest.approx(1.35)
    assert 0.135 / sweep_gap(0.2, 0.135, 10) == pytest.approx(0.10)
    # A sweep that mostly waited on the kernel is spaced by its wall time instead.
    assert sweep_gap(wall=0.5, cpu=0.01, max_cpu_percent=10) == pytest.approx(1.0)


def test_the_loop_wakes_only_for_the_next_check_or_sweep() -> None:
    """Between sweeps the loop wakes once per CHECK_EVERY for the counter check (each wake-up costs an
    idle daemon CPU), and at the sweep's due time; never before the last sweep's rest is over."""
    quiet = QUIET_PERIOD
    assert wake_at(last_sweep=100.0, last_check=float("-inf"), period=quiet, rest=0.01) == 101.0  # first check
    assert wake_at(100.0, 104.0, quiet, 0.01) == 104.0 + CHECK_EVERY
    assert wake_at(100.0, 109.5, quiet, 0.01) == 100.0 + quiet  # the sweep comes before the next check
    assert wake_at(100.0, float("-inf"), 1.0, 0.01) == 101.0  # busy: a sweep every interval
    assert wake_at(100.0, 101.0, quiet, 3.0) == 103.0  # no check (nor sweep) before the rest is over
    assert wake_at(100.0, float("-inf"), 1.0, 3.0) == 103.0


def test_the_loop_sleeps_whole_ticks_and_a_signal_still_wakes_it() -> None:
    """The daemon's loop sleeps in select() on signal.set_wakeup_fd's pipe: a SIGTERM ends the sleep at
    once (here: long before its 30 s), and the pipe is drained for the next sleep."""
    import signal
    import threading
    import time

    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda number, _frame: seen.append(number))
    wakeup = Wakeup()
    try:
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        started = time.monotonic()
        wakeup.sleep(30.0)
        assert time.monotonic() - started < 15.0
        assert seen == [signal.SIGUSR1]
        timer.join()
        started = time.monotonic()
        wakeup.sleep(0.05)  # drained: this one waits its time out
        assert time.monotonic() - started >= 0.04
    finally:
        wakeup.close()
        signal.signal(signal.SIGUSR1, previous)


def test_the_state_is_rewritten_when_what_it_shows_changes_or_every_publish_every(tmp_path: Path) -> None:
    """A quiet host's sweeps rewrite neither the state nor the metrics each time; any change to a figure,
    an owner or a finding is published at once, and a recent taken_at at least every PUBLISH_EVERY."""
    owner = (Process(4242, "nginx", "nginx", "nginx.service"),)
    policy = Policy(metrics=MetricsPolicy(textfile=str(tmp_path / "aqtune.prom")))
    publisher = silent_publisher(str(tmp_path))

    def publish(at: float, queue: int = 0, processes: tuple[Process, ...] = owner) -> float:
        rows = [Listener("host", "tcp", f"127.0.0.1:{n}", n, queue if n == 1 else 0, 16, 0, n, n, 0, processes)
                for n in range(1, 4)]
        snapshot = Snapshot(at, 0.01, [Namespace("host", 1, listeners=3)], rows)
        model = Model()
        model.update(snapshot, {})
        publisher.publish(snapshot, decide(snapshot, {}, model, policy, {}), {},
                          {"active": False, "probes": {}, "mode": "off"}, policy, DaemonFacts("dry-run", 0, 0, []))
        taken: float = json.loads((tmp_path / "status.json").read_text(encoding="utf-8"))["taken_at"]
        assert f"aqtune_last_sweep_timestamp_seconds {taken!r}" in (tmp_path / "aqtune.prom").read_text()
        return taken

    assert publish(100.0) == 100.0
    assert publish(105.0) == 100.0  # nothing changed
    assert publish(106.0, queue=3) == 106.0  # a queue moved
    # Owners compare by identity: the owner cache hands out the same tuple while they stay the same.
    other = (replace(owner[0], pid=4243),)
    assert publish(107.0, queue=3, processes=other) == 107.0
    assert publish(108.0, queue=3, processes=other) == 107.0
    assert publish(107.0 + PUBLISH_EVERY, queue=3, processes=other) == 107.0 + PUBLISH_EVERY


def test_cached_state_entries_and_metrics_lines_equal_a_fresh_publish(tmp_path: Path) -> None:
    """The daemon keeps quiet listeners' state entries and metrics lines from one publish to the next;
    what it writes after a change must be what a publisher starting afresh writes for the same sweep:
    changed queues, owners, eBPF counts, findings, a reuseport group and a stale namespace included."""
    nginx = (Process(4242, "nginx", "nginx: worker process", "nginx.service"),)
    quiet = ListenerEvents(enqueued=5, peak_queue=1, ack_overflow=0, syn_overflow=0, synack_retransmits=0,
                           accepts=5, queue_wait_ms={"p50": 1.0, "p99": 2.0}, requested_backlog=511)
    policy = Policy(metrics=MetricsPolicy(textfile=str(tmp_path / "{}.prom")))

    def sweep(at: float, full_queue: int, owner: tuple[Process, ...], enqueued: int) -> tuple[Snapshot, Any]:
        rows = [Listener("host" if n % 2 else "pid:9", "tcp", f"127.0.0.1:{8000 + n // 4}", 8000 + n // 4,
                         full_queue if n == 1 else n % 3, 16, n % 5, n, 1000 + n, 0, owner if n < 10 else nginx)
                for n in range(1, 41)]
        namespaces = [Namespace("host", 1, listeners=20), Namespace("pid:9", 9, listeners=20, stale=True, read_at=3.0)]
        snapshot = Snapshot(at, 0.01, namespaces, rows)
        events = {1000 + n: replace(quiet, enqueued=enqueued if n == 13 else 5) for n in range(1, 41, 3)}
        model = Model()
        model.update(snapshot, {}, events)
        return snapshot, (decide(snapshot, events, model, policy, {}, one_shot=True), events)

    def publish(publisher: Publisher, snapshot: Snapshot, found: Any, name: str) -> tuple[dict[str, Any], str]:
        textfile = str(tmp_path / f"{name}.prom")
        publisher.publish(snapshot, found[0], found[1], {"active": True, "probes": {}, "mode": "tracepoints"},
                          replace(policy, metrics=MetricsPolicy(textfile=textfile)), DaemonFacts("dry-run", 0, 0, []))
        document = json.loads((tmp_path / "status.json").read_text(encoding="utf-8"))
        document["daemon"].pop("started")
        return document, Path(textfile).read_text(encoding="utf-8")

    kept = silent_publisher(str(tmp_path))
    first, found = sweep(100.0, 0, nginx, 5)
    publish(kept, first, found, "kept")
    other = (replace(nginx[0], pid=4243),)
    second, found = sweep(101.0, 17, other, 9)  # one queue full (a finding), owners and an eBPF count moved
    assert found[0].assessment.listener_findings, "the full queue should make a finding"
    cached = publish(kept, second, found, "kept")
    fresh = publish(silent_publisher(str(tmp_path)), second, found, "fresh")
    assert cached == fresh
    assert cached[0]["listeners"][0]["queue"] == 17 and cached[0]["listeners"][0]["advice"]
    assert {l["group"]["members"] for l in cached[0]["listeners"] if l["group"]} == {2}
    # Nothing moved since: the listeners' part of both files is reused whole, with fresh timestamps.
    listing = kept.listing[1]
    later = replace(second, taken_at=101.0 + PUBLISH_EVERY)
    reused = publish(kept, later, found, "kept")
    assert kept.listing[1] is listing, "nothing the listeners show moved: their part is reused"
    assert reused == publish(silent_publisher(str(tmp_path)), later, found, "fresh")
    assert reused[0]["taken_at"] == later.taken_at and reused[0]["listeners"] == cached[0]["listeners"]
    assert f"aqtune_last_sweep_timestamp_seconds {later.taken_at!r}" in reused[1]
    # Metrics turned off by a reload while figures moved, then on again: the file shows the figures now.
    moved, found = sweep(200.0, 3, nginx, 5)
    kept.publish(moved, found[0], found[1], {"active": True, "probes": {}, "mode": "tracepoints"},
                 replace(policy, metrics=MetricsPolicy(textfile="")), DaemonFacts("dry-run", 0, 0, []))
    again = replace(moved, taken_at=200.0 + PUBLISH_EVERY)
    assert publish(kept, again, found, "kept")[1] == publish(silent_publisher(str(tmp_path)), again, found, "fresh")[1]


# --- the reply-chunk cache rests while listeners churn ------------------------------------------------


def test_the_chunk_cache_keeps_nothing_while_most_chunks_change() -> None:
    """A churn of listeners changes almost every chunk: keeping them then costs copies and memory for
    nothing, so the cache rests 1, 2, 4 up to MAX_REST sweeps, tries one sweep's chunks again, and
    keeps for good once most of them come back."""
    decoded = _Decoded("web", {}, [], 0, True)
    cache = ChunkCache()

    def sweep(looked: int, found: int) -> None:
        if cache.keeping:
            cache.keep(b"chunk", decoded)
        cache.looked, cache.found = (looked, found) if cache.previous else (0, 0)
        cache.rotate()

    sweep(0, 0)  # the first sweep: nothing to look in, keeps
    assert cache.keeping and cache.previous
    rests = []
    for _ in range(12):
        sweep(10, 2)  # most chunks changed
        rests.append(cache.resting)
        while not cache.keeping:
            assert not cache.previous  # nothing kept to look in while resting
            sweep(0, 0)
        sweep(0, 0)  # a sweep that keeps again
    assert rests[:5] == [1, 2, 4, 8, 8] and max(rests) == MAX_REST
    sweep(10, 5)  # half came back: worth keeping
    assert cache.keeping and cache.rest == 0 and cache.previous
    sweep(10, 10)
    assert cache.keeping and cache.previous

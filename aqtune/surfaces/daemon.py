"""The service loop around Runner.tick: when to sweep, systemd notifications, reload and stop.

Cost follows trouble: a sweep runs once per policy interval, or while everything is quiet (no
finding, every queue short) once per QUIET_PERIOD, never more than the policy's sustain window: any
refused connection moves the counters the check below reads, and brings a sweep within a second; a
queue filling up without refusing anything shows at the next quiet sweep. Between quiet sweeps a check every
CHECK_EVERY reads the listen-drop counters of namespaces with listeners (a setns and a file read
each, at most WATCHED_PER_CHECK of them per check, in turn); where they moved, a sweep of just those
namespaces comes early, at most once per TRIGGER_GAP. In between, the loop sleeps in select() until
the next check or sweep is due (``wake_at``), the watchdog's due time or a signal.

Bounded whatever local users create: each sweep has a time and a namespace budget (the policy's
[limits], and never more than a quarter of the watchdog's period), and the watchdog is fed between
namespaces, so a slow sweep is cut and reported ("partial sweep" in STATUS and the state), never a
watchdog restart. The next sweep also waits until the last one's CPU time is within the policy's
``[limits] max_cpu_percent`` of one core (and DUTY times its wall time), so sweeps that cost much
(a flood, listener churn) come less often instead of taking the CPU from the workload.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from aqtune.act.notify import Notifier
from aqtune.collect import netns, procfs
from aqtune.collect.sweep import SweepBudget, Sweeper
from aqtune.decide import policy as policies
from aqtune.messages import MessageId
from aqtune.surfaces.run import Runner

# Seconds between cheap counter checks (a setns and a 4 KB file read per watched namespace, ~0.15 ms):
# sweeps they bring forward wait for TRIGGER_GAP anyway.
CHECK_EVERY = 1.0
# Seconds the loop sleeps at least between two passes (a signal or the watchdog's due time wakes it
# sooner): an `interval` below it is swept every TICK, as before the loop slept until work was due.
TICK = 0.5
# Seconds between sweeps while all is quiet, at most: at 1,000 quiet listeners a sweep costs ~9 ms, and
# one every 5 s alone was 0.2% of a core, the whole idle budget (issue 16).
QUIET_PERIOD = 10.0
TRIGGER_GAP = 1.0  # seconds at least from one sweep to a sweep that moving counters bring forward
DUTY = 2.0  # a sweep starts no sooner than DUTY times the last one's duration after it: under half a core
WATCHED_PER_CHECK = 64  # namespaces whose counters one cheap check reads (the host's always, the rest in turn)
CHEAP_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPReqQFullDrop")


class Flag:
    """Set from a signal handler, read by the loop (which sleeps in Wakeup). Not a threading.Event: a
    handler runs in the main thread between two bytecodes, possibly while that thread holds the Event's
    own lock, and Event.set() would then wait for it forever. A plain attribute cannot deadlock."""

    def __init__(self) -> None:
        self.raised = False

    def set(self) -> None:
        self.raised = True

    def clear(self) -> None:
        self.raised = False

    def is_set(self) -> bool:
        return self.raised


class Wakeup:
    """Sleeps until a timeout or a signal, whichever comes first.

    Python's C-level signal handler writes the signal's number to a pipe (signal.set_wakeup_fd),
    so the loop can sleep whole ticks in select() and still stop at once: polling a flag every
    50 ms instead cost an idle daemon 0.12% of a core, more than half its budget. Main thread only.
    """

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.previous = signal.set_wakeup_fd(self.write_end, warn_on_full_buffer=False)

    def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        ready, _, _ = select.select([self.read_end], [], [], seconds)
        if ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.read_end, 512):
                    pass

    def close(self) -> None:
        signal.set_wakeup_fd(self.previous)
        os.close(self.read_end)
        os.close(self.write_end)


def sweep_seconds(wanted: float, notifier: Notifier) -> float:
    """The policy's sweep time budget, within a quarter of the watchdog's period (pings are half of it)."""
    return wanted if notifier.watchdog_every is None else min(wanted, notifier.watchdog_every / 2)


def budget(limits: policies.WorkLimits, notifier: Notifier) -> SweepBudget:
    return SweepBudget(sweep_seconds(limits.sweep_seconds, notifier), limits.namespaces, limits.listeners)


def sweep_gap(wall: float, cpu: float, max_cpu_percent: float) -> float:
    """Seconds from the start of a sweep that took ``wall`` seconds and ``cpu`` CPU seconds to the
    earliest next one: its CPU stays within ``max_cpu_percent`` of one core, and its wall time within
    1 / (1 + DUTY) of the time (a sweep waiting on the kernel still holds namespaces and locks)."""
    return max(DUTY * wall, cpu * 100.0 / max_cpu_percent)


def wake_at(last_sweep: float, last_check: float, period: float, rest: float) -> float:
    """When the loop next has something to do (time.monotonic()): the next counter check or sweep.

    The loop sleeps until then (or the watchdog's due time, or a signal): every wake-up costs an
    idle daemon CPU of its own, ~0.1 ms in a VM, so it wakes only when there is work."""
    sweep_at = last_sweep + max(period, rest)
    check_at = max(last_check + CHECK_EVERY, last_sweep + max(rest, min(period, TRIGGER_GAP)))
    return min(sweep_at, check_at)


def listen_counters(counters: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(counters.get(name, 0) for name in CHEAP_COUNTERS)


@dataclass(slots=True)
class CounterWatch:
    """The cheap check between sweeps: did the listen-drop counters of a namespace with listeners move?

    Reads at most ``per_check`` namespaces per check: the host's every time, the others in turn, so
    thousands of users' namespaces cost the same per tick as a few. Remembers one value per watched
    namespace, and where there are no more than ``per_check`` of them, keeps each one's counter
    file open: read through it, a check enters no namespace and opens nothing (a check came once a
    second and cost an idle daemon a quarter of its CPU). An open file also keeps its namespace
    alive, so one is closed as soon as its namespace is no longer watched.
    """

    per_check: int = WATCHED_PER_CHECK
    refs: list[netns.NamespaceRef] = field(default_factory=list)
    values: dict[netns.NamespaceRef, tuple[int, ...]] = field(default_factory=dict)
    turn: int = 0
    files: dict[netns.NamespaceRef, int] = field(default_factory=dict)  # open counter files, by namespace

    def watch(self, refs: list[netns.NamespaceRef], read: Mapping[netns.NamespaceRef, Mapping[str, int]]) -> None:
        """Watch ``refs`` from now on; ``read`` holds the counters a sweep just read (no move to report)."""
        self.refs = refs
        wanted = set(refs)
        for gone in self.files.keys() - (wanted if len(refs) <= self.per_check else set()):
            os.close(self.files.pop(gone))
        for gone in self.values.keys() - wanted:
            del self.values[gone]
        for ref, counters in read.items():
            if ref in wanted:
                self.values[ref] = listen_counters(counters)

    def batch(self) -> list[netns.NamespaceRef]:
        """The namespaces this check reads."""
        if len(self.refs) <= self.per_check:
            return self.refs
        host = [ref for ref in self.refs if ref.name == "host"]
        rest = [ref for ref in self.refs if ref.name != "host"]
        room = max(self.per_check - len(host), 0)
        start = self.turn % len(rest)
        self.turn = start + room
        return host + (rest[start:] + rest[:start])[:room]

    def moved(self) -> set[netns.NamespaceRef]:
        """The namespaces whose counters changed since they were last read."""
        moved = set()
        keep = len(self.refs) <= self.per_check
        for ref in self.batch():
            try:
                value = listen_counters(self._read(ref, keep))
            except (OSError, netns.NamespaceGone):
                continue
            if self.values.get(ref, value) != value:
                moved.add(ref)
            self.values[ref] = value
        return moved

    def _read(self, ref: netns.NamespaceRef, keep: bool) -> dict[str, int]:
        fd = self.files.get(ref)
        if fd is not None:
            return procfs.read_counters_at(fd)
        with netns.entered(ref):
            if not keep:
                return procfs.read_counters()
            fd = self.files[ref] = procfs.open_counters()
        return procfs.read_counters_at(fd)

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


def serve(runner: Runner, config_path: str, ebpf: bool = True) -> int:
    """Run until SIGTERM or SIGINT. SIGHUP reloads the policy; a bad one keeps the last good one."""
    stop, reload = Flag(), Flag()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    wakeup = Wakeup()
    try:
        return _loop(runner, config_path, ebpf, stop, reload, wakeup)
    finally:
        wakeup.close()


def _loop(runner: Runner, config_path: str, ebpf: bool, stop: Flag, reload: Flag, wakeup: Wakeup) -> int:
    notifier = Notifier()
    log = runner.log
    if ebpf:
        runner.start_events()
    mode = runner.mode
    log.info(f"aqtune running: mode {mode}, policy {runner.policy.source}, netns {runner.observer.select.wanted}, "
             f"state {runner.publisher.state_dir}", MessageId.LIFECYCLE, mode=mode)
    if runner.policy.apply_refused:
        log.warning(runner.policy.apply_refused, MessageId.LIFECYCLE)
    sweeper = runner.observer.sweeper
    # Fed between namespaces too: however long a sweep runs, the loop that runs it still answers.
    sweeper.progress = lambda: notifier.watchdog(time.monotonic())
    watch = CounterWatch()
    try:
        return _serve(runner, config_path, stop, reload, wakeup, notifier, sweeper, watch)
    finally:
        watch.close()


def _serve(runner: Runner, config_path: str, stop: Flag, reload: Flag, wakeup: Wakeup, notifier: Notifier,
           sweeper: Sweeper, watch: CounterWatch) -> int:
    log = runner.log
    last_sweep = last_check = float("-inf")
    rest = 0.0  # seconds from the last sweep's start before the next may begin (sweep_gap)
    ready = False
    while not stop.is_set():
        now = time.monotonic()
        if reload.is_set():
            reload.clear()
            _reload(runner, config_path)
        period = runner.policy.interval
        if runner.quiet():
            period = max(period, min(QUIET_PERIOD, runner.policy.saturation.sustain))
        since = now - last_sweep
        focus: set[netns.NamespaceRef] | None = None
        # Counters moving bring a sweep of their namespaces forward, but no sooner than TRIGGER_GAP:
        # under a flood they move every tick, and back-to-back sweeps would starve the loop.
        if rest <= since < period and since >= min(period, TRIGGER_GAP) and now - last_check >= CHECK_EVERY:
            last_check = now
            focus = watch.moved() or None
        if focus is not None or since >= max(period, rest):
            last_sweep = now
            cpu_before = time.process_time()
            sweeper.budget = budget(runner.policy.limits, notifier)
            try:
                runner.tick(focus)
            except (OSError, LookupError) as exc:
                log.error(f"sweep failed: {exc}; retrying next interval", MessageId.DEGRADED, component="sweep")
            rest = sweep_gap(time.monotonic() - now, time.process_time() - cpu_before,
                             runner.policy.limits.max_cpu_percent)
            watch.watch(sweeper.watched(),
                        {ref: sweeper.visits[ref].namespace.counters for ref in sweeper.read if ref in sweeper.visits})
            if not ready:
                notifier.send("READY=1")
                ready = True
            notifier.send(f"STATUS={runner.summary()}")
        # After the sweep, not before: a slow sweep must not stretch the gap between pings.
        notifier.watchdog(time.monotonic())
        if not stop.is_set():
            now = time.monotonic()
            wakeup.sleep(min(max(wake_at(last_sweep, last_check, period, rest) - now, TICK), notifier.until_due(now)))
    notifier.send("STOPPING=1")
    if runner.policy.apply.rollback_on_exit:
        runner.rollback()
    runner.close()
    log.info("aqtune stopped", MessageId.LIFECYCLE)
    return 0


def _reload(runner: Runner, config_path: str) -> None:
    try:
        new = policies.load(config_path)
    except policies.PolicyError as exc:
        problems = "; ".join(str(p) for p in exc.problems)
        runner.log.error(f"policy reload refused, keeping the previous policy: {problems}",
                         MessageId.LIFECYCLE, path=config_path)
        return
    runner.policy = new
    runner.log.info(f"policy reloaded from {config_path}: mode {new.mode}, interval {new.interval:g} s",
                    MessageId.LIFECYCLE, path=config_path)
    if new.apply_refused:
        runner.log.warning(new.apply_refused, MessageId.LIFECYCLE)

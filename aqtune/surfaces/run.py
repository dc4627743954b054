"""One tick of `aqtune run`, as a pipeline:

    observe (sweep + eBPF) -> model.observe -> decide (pure) -> model.settle
        -> carry out changes -> report findings -> report drop episodes -> publish state and metrics

Each stage is its own object with one job; Runner only wires them. The loop around it (timing,
signals, systemd) is in daemon.py.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from aqtune.act.changes import Applier
from aqtune.act.ledger import Ledger
from aqtune.act.log import EventLog
from aqtune.act.report import DegradedReporter, DropReporter, FindingReporter
from aqtune.collect import connections as conns
from aqtune.collect import netns, procfs, sockdiag
from aqtune.collect.ebpf import EMIT_DROPS, Event, EventLayer, Unavailable, unavailable_status
from aqtune.collect.sweep import Sweeper
from aqtune.decide.policy import Policy
from aqtune.decide.tick import Decision, decide, history_horizon
from aqtune.messages import MessageId
from aqtune.model.history import ListenerKey, Model
from aqtune.records import ConnectionSummary, ListenerEvents, Snapshot
from aqtune.surfaces.publish import DaemonFacts, Publisher
from aqtune.text import cescape

CONNECTIONS_EVERY = 5.0  # seconds between looks at the connections of full listeners (an fd scan each)
MAX_LOOKED_AT = 20  # full listeners whose connections one look reads: bounded whatever users create


@dataclass(slots=True)
class Observation:
    snapshot: Snapshot
    events: Mapping[int, ListenerEvents]
    cpu_seconds: dict[int, float]
    connections: Mapping[ListenerKey, ConnectionSummary] = field(default_factory=dict)
    serving: Mapping[int, set[int]] = field(default_factory=dict)


@dataclass(slots=True)
class Observer:
    """The collect stage: the bounded sweeps (with their owner cache) and the eBPF event layer, if loaded."""

    select: netns.Selection  # resolved once: a daemon started for pid:N follows that namespace, not the pid
    owners: procfs.OwnerCache = field(default_factory=procfs.OwnerCache)
    sweeper: Sweeper = field(default_factory=Sweeper)
    events: EventLayer | None = None
    ebpf_status: dict[str, Any] = field(default_factory=lambda: unavailable_status("not started"))
    looked: tuple[float, dict[ListenerKey, ConnectionSummary], dict[int, set[int]]] = (float("-inf"), {}, {})

    def start_events(self, log: EventLog, on_event: Any) -> None:
        """Load the eBPF layer, or say why aqtune runs on the sweep alone."""
        try:
            # Compiled in a short-lived child: bcc, clang and LLVM never map into the daemon.
            self.events = EventLayer.start_in_child(emit=EMIT_DROPS)
        except Unavailable as exc:
            _return_heap()
            self.ebpf_status = unavailable_status(f"unavailable: {exc}")
            log.warning(f"eBPF unavailable, running on sock_diag sweeps alone: {exc}", MessageId.DEGRADED,
                        ebpf="unavailable")
            return
        self.ebpf_status = self.events.status()
        self.events.on_event(on_event)
        _return_heap()
        log.info(f"eBPF: {self.events.mode}", ebpf="active", offsets=self.events.offsets_from)
        for probe, how in self.events.probes.items():
            if not how.attached:
                log.warning(f"eBPF probe {probe} {how}", MessageId.DEGRADED, probe=probe)

    def observe(self, policy: Policy, focus: Collection[netns.NamespaceRef] | None = None) -> Observation:
        snapshot = self.sweeper.sweep(self.select, self.owners, focus)
        pids = {p.pid for listener in snapshot.listeners for p in listener.processes}
        observed: dict[int, ListenerEvents] = {}
        if self.events:
            self.events.poll(0)
            observed = self.events.read({listener.inode: listener.queue for listener in snapshot.listeners})
            self.ebpf_status = self.events.status()
            self.events.forget_closed({listener.inode for listener in snapshot.listeners})
        summaries, serving = self._connections(snapshot, policy)
        return Observation(snapshot, observed, procfs.cpu_seconds(pids), summaries, serving)

    def _connections(self, snapshot: Snapshot,
                     policy: Policy) -> tuple[dict[ListenerKey, ConnectionSummary], dict[int, set[int]]]:
        """What holds the workers of full listeners (and which process serves each reuseport sibling):
        read only for listeners full now, at most MAX_LOOKED_AT, every CONNECTIONS_EVERY seconds."""
        full = sorted((l for l in snapshot.listeners if l.fill >= policy.saturation.fill_ratio),
                      key=lambda l: -l.fill)[:MAX_LOOKED_AT]
        when, summaries, serving = self.looked
        if not full:
            self.looked = (when, {}, {})
            return {}, {}
        if snapshot.taken_at - when < CONNECTIONS_EVERY:
            return summaries, serving
        wanted = conns.with_group_members(full, snapshot.listeners)
        try:
            summaries = conns.summarize(snapshot.namespaces, wanted, policy.connections.long_after,
                                        policy.connections.idle_after,
                                        accepted_at=self.events.accepted_at if self.events else None)
            serving = conns.serving(wanted)
        except (OSError, netns.NamespaceGone, sockdiag.NetlinkError):
            summaries, serving = {}, {}  # a namespace gone meanwhile: the next look will do
        self.looked = (snapshot.taken_at, summaries, serving)
        return summaries, serving

    def close(self) -> None:
        if self.events:
            self.events.close()


def _return_heap() -> None:
    """Give the memory clang and LLVM used to compile the eBPF program back to the system: glibc keeps
    freed heap for reuse otherwise, and the daemon never compiles again (tens of MiB of RSS)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim this way
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Runner:
    """The daemon's tick: each stage below has one job."""

    def __init__(self, policy: Policy, select: str, ledger: Ledger, dry_run: bool, log: EventLog,
                 state_dir: str | None = None) -> None:
        self.policy = policy
        self.log = log
        self.observer = Observer(netns.resolve_selection(select))
        self.model = Model()
        self.applier = Applier(ledger, log, dry_run)
        self.findings = FindingReporter(log)
        self.drops = DropReporter(log)
        self.publisher = Publisher(state_dir, DegradedReporter(log))
        self._calm = False  # every queue below clear_ratio at the last sweep

    @property
    def mode(self) -> str:
        return "dry-run" if self.applier.dry_run else self.policy.mode

    def start_events(self) -> None:
        self.observer.start_events(self.log, self._remember_peer)

    def _remember_peer(self, event: Event) -> None:
        if event.peer is not None:
            self.drops.remember_peer(event.inode, event.peer)

    def tick(self, focus: Collection[netns.NamespaceRef] | None = None) -> tuple[Snapshot, Decision]:
        """One tick; ``focus`` limits the sweep to those namespaces (their counters moved)."""
        seen = self.observer.observe(self.policy, focus)
        # Fed between stages too, not only between namespaces: one namespace under heavy listener churn
        # is a sweep of 0.2 s of CPU, and on a saturated host its stages wait for a CPU in between.
        progress = self.observer.sweeper.progress
        progress()
        snapshot = seen.snapshot
        self.model.observe(snapshot, seen.cpu_seconds, history_horizon(self.policy), seen.events)
        ledger = self.applier.ledger
        self.applier.follow_ledger(snapshot)
        decision = decide(snapshot, seen.events, self.model, self.policy,
                          {ns.inode: ledger.managed(ns.inode) for ns in snapshot.namespaces},
                          connections=seen.connections, serving=seen.serving)
        self.model.settle(decision.judged)
        progress()
        for namespace in snapshot.namespaces:
            if namespace.error and not namespace.error.startswith("vanished"):
                self.publisher.degraded(f"netns {namespace.name}", f"netns {namespace.name} {namespace.error}",
                              snapshot.taken_at)
        self.findings.report(snapshot, decision, self.policy.journal)
        self.applier.carry_out(decision.changes, self.policy, {ns.inode: ns for ns in snapshot.namespaces})
        self.drops.report(snapshot, self.model, seen.events, decision, self.policy.journal)
        progress()
        facts = DaemonFacts(self.mode, self.drops.suppressed_total, self.log.refused,
                            list(self.applier.actions))
        self.publisher.publish(snapshot, decision, seen.events, self.observer.ebpf_status, self.policy, facts)
        self._calm = all(l.fill < self.policy.saturation.clear_ratio for l in snapshot.listeners)
        return snapshot, decision

    def quiet(self) -> bool:
        """Nothing to watch closely: no finding, no drop episode under way, every queue short."""
        return self._calm and self.drops.quiet and self.findings.quiet

    def rollback(self) -> None:
        self.applier.rollback()

    def close(self) -> None:
        self.observer.close()

    def summary(self) -> str:
        """The one line systemd shows as the service's status (names escaped: they are users')."""
        document, worst = self.publisher.last, self.publisher.worst
        if document is None:
            return "starting"
        worst_text = f"worst fill {worst.fill:.2f} ({cescape(worst.address)})" if worst else "no listeners"
        ebpf = document["ebpf"]
        ebpf_text = ("eBPF " + ebpf["mode"].split(":")[0]) if ebpf["active"] else "eBPF off"
        refused = self.log.refused
        sweep, left_out = document["sweep"], document["left_out"]
        return (f"watching {self.publisher.listed + left_out['listeners']} listeners in "
                f"{len(document['namespaces']) + left_out['namespaces']} netns; {worst_text}; "
                f"{document['daemon']['drops_last_minute']} drops in the last minute; "
                f"mode {document['daemon']['mode']}; {ebpf_text}"
                + (f"; {refused} journal entries refused" if refused else "")
                + (f"; partial sweep: {sweep['skipped_namespaces']} namespaces left for the next sweep"
                   if sweep["partial"] else "")
                + (f"; {sweep['skipped_listeners']} listeners over the limit, sampled round-robin"
                   if sweep["skipped_listeners"] else ""))

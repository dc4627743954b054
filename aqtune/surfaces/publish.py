"""What the daemon shows between sweeps: the live state `aqtune status` reads, and the metrics file.

Both are rewritten when what they show changes, and otherwise every PUBLISH_EVERY seconds, so that
readers see a recent ``taken_at`` (and the metrics a recent last-sweep time): on a quiet host,
encoding and writing them was half of what a sweep cost.

Their size is capped whatever local users create: the worst ``[limits] published_listeners``
listeners and PUBLISHED_NAMESPACES namespaces are listed, the rest counted in ``left_out``, and each
command line is cut to CMDLINE_SHOWN characters (one user's 1 MiB command line on 100 sockets would
otherwise make a 300 MB file every sweep). What the sweep's budgets left out is in ``sweep``.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from aqtune.act import metrics, state
from aqtune.act.report import DegradedReporter
from aqtune.decide.findings import Finding
from aqtune.decide.policy import Policy
from aqtune.decide.tick import Decision
from aqtune.model.groups import group_json, reuseport_groups
from aqtune.model.history import ListenerWindow
from aqtune.records import Listener, ListenerEvents, Namespace, Process, Snapshot
from aqtune.surfaces import status

PUBLISH_EVERY = state.PUBLISH_EVERY  # seconds between rewrites showing nothing new; readers allow three of them
PUBLISHED_NAMESPACES = 1000  # listed in the state file; namespaces with listeners, advice or errors first
CMDLINE_SHOWN = 256  # characters of each owner's command line in the state file
ELLIPSIS = "\u2026"


def shown_namespaces(namespaces: list[Namespace], limit: int, advised: set[str]) -> list[Namespace]:
    """At most ``limit`` namespaces, the ones worth reading first, in their sweep order (pure)."""
    if len(namespaces) <= limit:
        return namespaces
    ranked = sorted(range(len(namespaces)), key=lambda i: (
        namespaces[i].name != "host", namespaces[i].name not in advised, namespaces[i].error is None,
        namespaces[i].listeners == 0, namespaces[i].stale))
    return [namespaces[i] for i in sorted(ranked[:limit])]


def truncated(text: str, limit: int = CMDLINE_SHOWN) -> str:
    return text if len(text) <= limit else text[:limit - 1] + ELLIPSIS


def published(snapshot: Snapshot, listeners: int, advised: set[str]) -> Snapshot:
    """The part of ``snapshot`` the state file lists: the worst ``listeners`` listeners and the
    namespaces worth listing (pure; the rows are shared, not copied)."""
    rows = snapshot.listeners
    if len(rows) > listeners:
        rows = status.worst_first(rows)[:listeners]
    namespaces = shown_namespaces(snapshot.namespaces, PUBLISHED_NAMESPACES, advised)
    return replace(snapshot, listeners=rows, namespaces=namespaces)


@dataclass(frozen=True, slots=True)
class DaemonFacts:
    """What the state file says about the daemon itself."""

    mode: str
    suppressed: int
    refused: int
    actions: list[dict[str, Any]]


def shown_now(snapshot: Snapshot, decision: Decision, events: Mapping[int, ListenerEvents], ebpf: dict[str, Any],
              drops_last_minute: int, facts: DaemonFacts) -> tuple[object, ...]:
    """What the state and metrics would show, as a value to compare with the last one published: every
    listener's figures and owners, the findings' texts, the counters, eBPF's state. The first three
    items (listeners, eBPF's counts, findings) are kept whole, not hashed: equal, they let the
    listeners' part of both files be reused as it is (Publisher.listing). Owners compare by identity
    first: the owner cache hands out the same tuple while they stay the same."""
    listeners = tuple((l.cookie, l.netns, l.address, l.queue, l.backlog, l.drops, l.processes)
                      for l in snapshot.listeners)
    seen = tuple(events.items())  # every field of what eBPF saw: the state shows them all
    found = decision.assessment
    findings = (dict(found.listener_findings),  # texts and evidence: both are in the state
                tuple((name, tuple(f.text for f in fs)) for name, fs in found.namespace_findings.items()),
                tuple((name, tuple(f.text for f in fs)) for name, fs in decision.held.items()))
    namespaces = hash(tuple((ns.inode, ns.name, ns.stale, ns.error, tuple(ns.counters.items()),
                             tuple(ns.sysctls.items())) for ns in snapshot.namespaces))
    return (listeners, seen, findings, namespaces, drops_last_minute, len(facts.actions), facts.suppressed,
            facts.refused, facts.mode, str(ebpf.get("mode")), snapshot.skipped_namespaces, snapshot.skipped_listeners)


# What one listener's entry in the state is made of: any change to these makes it again. The listener's
# figures are copied into the key, not the record held: records are mutable (owners are set on them).
_Figures = tuple[str, str, str, int | None, int, int, int | None, int, int | None, tuple[Process, ...]]
_EntryKey = tuple[_Figures, ListenerEvents | None, tuple[Finding, ...], dict[str, Any] | None,
                  tuple[float, bool, float, int | None] | None, bool]


class EntryCache:
    """Each listed listener's JSON text in the state file, from the last publish, by socket cookie.

    A quiet listener's entry is the same text publish after publish, and building and encoding a
    thousand of them was most of what publishing cost an idle daemon; an entry is made again only
    when a figure, owner, finding, event count or history figure behind it changed. Holds the
    listeners of the last publish only (at most ``[limits] published_listeners``).
    """

    def __init__(self) -> None:
        self.entries: dict[int, tuple[_EntryKey, str]] = {}

    def get(self, cookie: int, key: _EntryKey) -> str | None:
        cached = self.entries.get(cookie)
        return cached[1] if cached is not None and cached[0] == key else None

    def put(self, cookie: int, key: _EntryKey, entry: dict[str, Any]) -> str:
        text = json.dumps(entry, separators=(",", ":"), check_circular=False)
        self.entries[cookie] = (key, text)
        return text

    def keep_only(self, cookies: set[int]) -> None:
        if len(self.entries) > len(cookies):
            self.entries = {cookie: entry for cookie, entry in self.entries.items() if cookie in cookies}


def _history(window: ListenerWindow | None) -> tuple[float, bool, float, int | None] | None:
    if window is None:
        return None
    return round(window.peak_fill, 4), window.saturated, round(window.high_for, 1), window.drops


def listener_entry(listener: Listener, findings: list[Finding], events: ListenerEvents | None,
                   group: dict[str, Any] | None, history: tuple[float, bool, float, int | None] | None,
                   stale: bool) -> dict[str, Any]:
    """One listener as the state file lists it: as `status --json` shows it, with its history, whether
    its namespace was read this sweep, and command lines cut to CMDLINE_SHOWN."""
    entry = status.listener_json(listener, findings, events, group)
    if history is not None:
        peak_fill, saturated, high_for, drops = history
        entry["history"] = {"peak_fill": peak_fill, "saturated": saturated, "high_for": high_for,
                            "drops_in_window": drops}
    entry["stale"] = stale
    for process in entry["processes"]:
        process["cmdline"] = truncated(process["cmdline"])
    return entry


@dataclass(slots=True)
class Publisher:
    state_dir: str | None
    degraded: DegradedReporter
    listen_drops: deque[tuple[float, int]] = field(default_factory=deque)  # (when, ListenDrops added since)
    listen_drops_seen: dict[str, int] = field(default_factory=dict)  # per namespace in the last snapshot
    published: tuple[float, tuple[object, ...]] = (float("-inf"), ())  # when, and what it showed
    last: dict[str, Any] | None = None  # the last state document, without its listeners
    worst: Listener | None = None  # the first listener it lists, if any
    listed: int = 0  # how many listeners it lists
    entries: EntryCache = field(default_factory=EntryCache)  # listed listeners' JSON texts
    # What the listeners' part of the last publish was made from, and that part (entries worst first,
    # the worst listener, how many were left out): equal inputs, a quiet host's usual case, reuse it
    # without a sort or a per-listener look-up.
    listing: tuple[object, tuple[list[str], Listener | None, int, int]] = (None, ([], None, 0, 0))
    rendered: object = None  # the listing the metrics file was last rendered from (a reload may turn it off)
    metric_lines: metrics.LineCache = field(default_factory=metrics.LineCache)  # quiet listeners' series
    started: float = field(default_factory=time.time)

    def drops_last_minute(self, snapshot: Snapshot) -> int:
        """ListenDrops added over the last minute, from each namespace's own increase: namespaces come
        and go from the snapshot (idle ones are read now and then), which a host-wide sum would count."""
        seen = {ns.name: ns.counters["ListenDrops"] for ns in snapshot.namespaces if "ListenDrops" in ns.counters}
        before = self.listen_drops_seen
        added = sum(max(value - before[name], 0) for name, value in seen.items() if name in before)
        self.listen_drops_seen = seen
        self.listen_drops.append((snapshot.taken_at, added))
        while self.listen_drops and snapshot.taken_at - self.listen_drops[0][0] >= 60:
            self.listen_drops.popleft()
        return sum(added for _, added in self.listen_drops)

    def publish(self, snapshot: Snapshot, decision: Decision, events: Mapping[int, ListenerEvents],
                ebpf: dict[str, Any], policy: Policy, facts: DaemonFacts) -> None:
        drops_last_minute = self.drops_last_minute(snapshot)
        shown = shown_now(snapshot, decision, events, ebpf, drops_last_minute, facts)
        if shown == self.published[1] and snapshot.taken_at - self.published[0] < PUBLISH_EVERY:
            return
        self.published = (snapshot.taken_at, shown)
        advised = set(decision.assessment.namespace_findings) | set(decision.held)
        stale = {ns.name for ns in snapshot.namespaces if ns.stale}
        limit = policy.limits.published_listeners
        windows = tuple((key, _history(window)) for key, window in decision.assessment.windows.items())
        listing = (shown[:3], windows, frozenset(stale), limit, bool(ebpf.get("active")))
        if listing != self.listing[0]:
            rows = status.worst_first(published(snapshot, limit, advised).listeners)
            self.listing = (listing, (self._entries(rows, decision, events, stale), rows[0] if rows else None,
                                      len(rows), len(snapshot.listeners) - len(rows)))
        entries, worst, count, left_out = self.listing[1]
        listed = replace(snapshot, listeners=[], namespaces=shown_namespaces(snapshot.namespaces, PUBLISHED_NAMESPACES,
                                                                               advised))
        document = status.snapshot_json(listed, decision.assessment, events, ebpf, source="daemon")
        del document["listeners"]  # encoded apart, from the entry cache
        for shown_ns, namespace in zip(document["namespaces"], listed.namespaces, strict=True):
            shown_ns["stale"], shown_ns["read_at"] = namespace.stale, namespace.read_at
        document["sweep"] = {"partial": snapshot.partial, "skipped_namespaces": snapshot.skipped_namespaces,
                             "skipped_listeners": snapshot.skipped_listeners,
                             "idle_namespaces": snapshot.idle_namespaces, "stale_namespaces": len(stale)}
        document["left_out"] = {"listeners": left_out, "namespaces": len(snapshot.namespaces) - len(listed.namespaces)}
        document["daemon"] = {
            "pid": os.getpid(), "started": self.started, "interval": policy.interval,
            "publish_every": PUBLISH_EVERY, "mode": facts.mode, "policy": policy.source,
            "drops_last_minute": drops_last_minute, "journal_suppressed": facts.suppressed,
            "journal_refused": facts.refused, "actions": facts.actions,
        }
        self.last, self.worst, self.listed = document, worst, count
        now = time.time()
        if self.state_dir:
            try:
                state.write_state(self.state_dir, document, entries)
            except OSError as exc:
                self.degraded("state", f"cannot write state to {self.state_dir}: {exc.strerror}; "
                              "`aqtune status` will sweep on its own", now)
        textfile = policy.metrics.textfile
        if textfile:
            try:
                metrics.write(textfile, snapshot, events, metrics.DaemonFigures(
                    sweep_seconds=snapshot.duration, last_sweep=snapshot.taken_at,
                    ebpf_active=bool(ebpf.get("active")), journal_suppressed=facts.suppressed,
                    journal_refused=facts.refused), cache=self.metric_lines,
                    listeners_unchanged=listing == self.rendered)
                self.rendered = listing
            except FileNotFoundError:
                # No node_exporter textfile directory: nothing collects the file, which is a choice,
                # not a fault.
                self.degraded.notice("metrics-directory", f"metrics not written: no directory for {textfile} "
                                     "(install prometheus-node-exporter, or set [metrics] textfile)", now)
            except OSError as exc:
                self.degraded("metrics", f"cannot write {textfile}: {exc.strerror}", now)

    def _entries(self, rows: list[Listener], decision: Decision, events: Mapping[int, ListenerEvents],
                 stale: set[str]) -> list[str]:
        """Each listed listener's JSON text, worst first: made again only where what it shows changed."""
        found, windows = decision.assessment.listener_findings, decision.assessment.windows
        groups = reuseport_groups(rows)
        cache, texts = self.entries, []
        for listener in rows:
            where = (listener.netns, listener.cookie)
            findings = found.get(where, [])
            seen, group = events.get(listener.inode), group_json(listener, groups)
            history = _history(windows.get(where))
            figures: _Figures = (listener.netns, listener.proto, listener.address, listener.port, listener.queue,
                                 listener.backlog, listener.drops, listener.inode, listener.uid, listener.processes)
            key: _EntryKey = (figures, seen, tuple(findings), group, history, listener.netns in stale)
            text = cache.get(listener.cookie, key)
            if text is None:
                text = cache.put(listener.cookie, key,
                                 listener_entry(listener, findings, seen, group, history, listener.netns in stale))
            texts.append(text)
        cache.keep_only({listener.cookie for listener in rows})
        return texts

"""What the daemon shows between sweeps: the live state `aqtune status` reads, and the metrics file.

Both are rewritten every sweep, unless that costs over a tenth of the interval (at 10,000 listeners
they are megabytes): then when what they show changes, else every PUBLISH_EVERY seconds.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aqtune.act import metrics, state
from aqtune.act.report import DegradedReporter
from aqtune.decide.policy import Policy
from aqtune.decide.tick import Decision
from aqtune.records import ListenerEvents, Snapshot
from aqtune.surfaces import status

PUBLISH_EVERY = 5.0


@dataclass(frozen=True, slots=True)
class DaemonFacts:
    """What the state file says about the daemon itself."""

    mode: str
    suppressed: int
    refused: int
    actions: list[dict[str, Any]]


@dataclass(slots=True)
class Publisher:
    state_dir: str | None
    degraded: DegradedReporter
    listen_drops: deque[tuple[float, int]] = field(default_factory=deque)  # (when, ListenDrops summed)
    published: tuple[float, tuple[int, ...]] = (float("-inf"), ())  # when, and what it showed
    took: float = 0.0  # seconds the last state and metrics write took
    last: dict[str, Any] | None = None  # the last status document
    started: float = field(default_factory=time.time)

    def drops_last_minute(self, snapshot: Snapshot) -> int:
        total = sum(ns.counters.get("ListenDrops", 0) for ns in snapshot.namespaces)
        self.listen_drops.append((snapshot.taken_at, total))
        while len(self.listen_drops) > 1 and snapshot.taken_at - self.listen_drops[1][0] >= 60:
            self.listen_drops.popleft()
        return max(total - self.listen_drops[0][1], 0)

    def publish(self, snapshot: Snapshot, decision: Decision, events: Mapping[int, ListenerEvents],
                ebpf: dict[str, Any], policy: Policy, facts: DaemonFacts) -> None:
        drops_last_minute = self.drops_last_minute(snapshot)
        shown = (len(snapshot.listeners), sum(l.queue for l in snapshot.listeners),
                 sum(l.drops or 0 for l in snapshot.listeners), drops_last_minute,
                 len(decision.assessment.listener_findings), len(facts.actions),
                 sum(events[l.inode].enqueued for l in snapshot.listeners if l.inode in events))
        costly = self.took > 0.1 * policy.interval
        if costly and shown == self.published[1] and snapshot.taken_at - self.published[0] < PUBLISH_EVERY:
            return
        self.published = (snapshot.taken_at, shown)
        started = time.monotonic()
        document = status.snapshot_json(snapshot, decision.assessment, events, ebpf, source="daemon")
        windows = decision.assessment.windows
        for listener in document["listeners"]:
            window = windows.get((listener["netns"], listener["cookie"]))
            if window is not None:
                listener["history"] = {"peak_fill": round(window.peak_fill, 4), "saturated": window.saturated,
                                       "high_for": round(window.high_for, 1), "drops_in_window": window.drops}
        document["daemon"] = {
            "pid": os.getpid(), "started": self.started, "interval": policy.interval,
            "publish_every": PUBLISH_EVERY, "mode": facts.mode, "policy": policy.source,
            "drops_last_minute": drops_last_minute, "journal_suppressed": facts.suppressed,
            "journal_refused": facts.refused, "actions": facts.actions,
        }
        self.last = document
        now = time.time()
        if self.state_dir:
            try:
                state.write_state(self.state_dir, document)
            except OSError as exc:
                self.degraded("state", f"cannot write state to {self.state_dir}: {exc.strerror}; "
                              "`aqtune status` will sweep on its own", now)
        textfile = policy.metrics.textfile
        if textfile:
            try:
                metrics.write(textfile, snapshot, events, metrics.DaemonFigures(
                    sweep_seconds=snapshot.duration, last_sweep=snapshot.taken_at,
                    ebpf_active=bool(ebpf.get("active")), journal_suppressed=facts.suppressed,
                    journal_refused=facts.refused))
            except FileNotFoundError:
                # No node_exporter textfile directory: nothing collects the file, which is a choice,
                # not a fault.
                self.degraded.notice("metrics-directory", f"metrics not written: no directory for {textfile} "
                                     "(install prometheus-node-exporter, or set [metrics] textfile)", now)
            except OSError as exc:
                self.degraded("metrics", f"cannot write {textfile}: {exc.strerror}", now)
        self.took = time.monotonic() - started

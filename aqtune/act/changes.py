"""Carrying out planned sysctl changes: write them (ledger first), or say why not, and roll back."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aqtune.act import persist, sysctl
from aqtune.act.ledger import Ledger, LedgerError
from aqtune.act.log import EventLog
from aqtune.act.throttle import Throttle
from aqtune.collect import netns
from aqtune.decide.policy import Policy
from aqtune.decide.tick import Planned
from aqtune.decide.tuning import refusal
from aqtune.messages import MessageId
from aqtune.records import Namespace, Snapshot

REMIND_AFTER = 300.0  # seconds before an unchanged recommendation, or a failed write, comes again
RECENT_ACTIONS = 20


@dataclass(slots=True)
class Applier:
    ledger: Ledger
    log: EventLog
    dry_run: bool
    sysctl_d_file: str = persist.SYSCTL_D_FILE
    # The same recommendation comes every sweep while nothing writes it: said once per REMIND_AFTER,
    # or when the value it asks for changes.
    recommended: Throttle[tuple[str, str]] = field(default_factory=lambda: Throttle(REMIND_AFTER))
    # A write that failed (read-only /proc/sys...) is retried after REMIND_AFTER, not every sweep.
    failed: Throttle[tuple[str, str]] = field(default_factory=lambda: Throttle(REMIND_AFTER))
    actions: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_ACTIONS))

    def follow_ledger(self, snapshot: Snapshot) -> None:
        """Notice `aqtune rollback` run while the daemon runs, and forget records of namespaces that are
        gone (a new namespace reusing a dead one's inode must not be judged by them)."""
        try:
            if self.ledger.refresh():
                # Its values are back where they were: what was recommended may be said again.
                self.recommended = Throttle(REMIND_AFTER)
                self.log.info(f"change record {self.ledger.path} changed on disk (`aqtune rollback`?): re-read",
                              MessageId.ROLLBACK)
        except LedgerError as exc:
            self.log.error(f"cannot re-read {self.ledger.path}: {exc}; keeping the records read before",
                           MessageId.DEGRADED, component="ledger")
            return
        try:
            for entry in self.ledger.drop_stale(snapshot.namespaces):
                self.log.warning(f"forgot the record of {entry.sysctl} in netns {entry.netns}: that namespace is "
                                 "gone and its inode belongs to another one now", MessageId.ROLLBACK,
                                 netns=entry.netns, sysctl=entry.sysctl, outcome="gone")
        except OSError as exc:
            self.log.error(f"cannot update {self.ledger.path}: {exc}", MessageId.DEGRADED, component="ledger")

    def carry_out(self, planned: list[Planned], policy: Policy, namespaces: dict[int, Namespace]) -> None:
        for item in planned:
            namespace = namespaces.get(item.netns_inode)
            if namespace is not None:
                self._one(item, policy, namespace)

    def _one(self, item: Planned, policy: Policy, namespace: Namespace) -> None:
        change = item.change
        key = (change.netns, change.sysctl)
        now = time.time()
        fields: dict[str, Any] = {"netns": change.netns, "sysctl": change.sysctl, "old": change.old,
                                  "new": change.new, "reason": change.reason}
        why_not = refusal(change, policy, self.dry_run)
        if why_not:
            if self.recommended.due_if_grown(key, now, change.new):
                self.actions.append({**fields, "at": now, "applied": False, "why_not": why_not})
                self.log.info(f"recommend {change.sysctl}={change.new} in netns {change.netns} "
                              f"(now {change.old}); not applied: {why_not}", MessageId.RECOMMENDATION, **fields)
            return
        if self.failed.holds(key, now):
            return
        try:
            # Pinned to the namespace that was judged: its cookie, not just an inode the kernel may reuse.
            ref = netns.NamespaceRef(change.netns, item.netns_inode, namespace.path, namespace.cookie)
            sysctl.apply_change(self.ledger, ref, change.sysctl, change.old, change.new)
        except (OSError, netns.NamespaceGone) as exc:
            self.failed.due(key, now)
            self.log.error(f"could not set {change.sysctl} in netns {change.netns}: {exc}; "
                           f"next try in {REMIND_AFTER:.0f} s", MessageId.SYSCTL_CHANGE, **fields)
            return
        self.failed.forget(key)
        self.actions.append({**fields, "at": time.time(), "applied": True, "why_not": None})
        self.log.warning(f"set {change.sysctl} {change.old} -> {change.new} in netns {change.netns}: "
                         f"{change.reason}", MessageId.SYSCTL_CHANGE, **fields)
        if policy.apply.persist and change.netns == "host":
            try:
                persist.sync_host_file(self.ledger.entries, self.sysctl_d_file)
            except OSError as exc:
                self.log.error(f"could not persist to {self.sysctl_d_file}: {exc}; the change holds until reboot",
                               MessageId.SYSCTL_CHANGE, **fields)

    def rollback(self) -> None:
        for result in sysctl.rollback(self.ledger):
            self.log.warning(f"rollback {result.outcome}: netns {result.netns} {result.sysctl}: {result.detail}",
                             MessageId.ROLLBACK, netns=result.netns, sysctl=result.sysctl, outcome=result.outcome)

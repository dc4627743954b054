"""`aqtune run`: sweep, judge, recommend or apply, on the policy's interval, in the foreground."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aqtune.act import persist, sysctl
from aqtune.act.ledger import Ledger
from aqtune.collect import netns, procfs
from aqtune.collect.ebpf import EMIT_DROPS, EventLayer, Unavailable
from aqtune.collect.sweep import sweep
from aqtune.decide.assess import Assessment, assess
from aqtune.decide.diagnose import Finding
from aqtune.decide.policy import Policy
from aqtune.decide.tuning import Change, NamespaceState, plan, refusal
from aqtune.model.history import Model
from aqtune.records import Snapshot

REMIND_AFTER = 300.0  # seconds before a finding that persists is logged again


@dataclass(slots=True)
class Runner:
    policy: Policy
    select: str
    ledger: Ledger
    dry_run: bool
    log: Any
    model: Model = field(default_factory=Model)
    logged: dict[tuple[str, str], float] = field(default_factory=dict)  # (subject, finding id) -> when
    recommended: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)
    events: EventLayer | None = None
    sysctl_d_file: str = persist.SYSCTL_D_FILE

    def tick(self) -> tuple[Snapshot, Assessment, list[Change]]:
        snapshot = sweep(self.select)
        pids = {p.pid for listener in snapshot.listeners for p in listener.processes}
        self.model.update(snapshot, procfs.cpu_seconds(pids))
        horizon = max([self.policy.saturation.sustain, *(r.sustain or 0 for r in self.policy.listeners)])
        self.model.forget_before(snapshot.taken_at - horizon - 2 * self.policy.interval)
        inodes = {ns.name: ns.inode for ns in snapshot.namespaces}
        managed = {name: self.ledger.managed(inode) for name, inode in inodes.items()}
        observed = self.events.read() if self.events else {}
        requested = {inode: e.requested_backlog for inode, e in observed.items() if e.requested_backlog}
        result = assess(snapshot, self.model, self.policy, managed, requested=requested)
        for key, window in result.windows.items():
            self.model.listeners[key].saturated = window.saturated
        by_namespace = result.by_namespace(snapshot)
        changes: list[tuple[Change, int]] = []
        held: dict[str, list[Finding]] = {}
        for namespace in snapshot.namespaces:
            state = NamespaceState(namespace.name, namespace.sysctls, by_namespace.get(namespace.name, []),
                                   result.namespace_findings.get(namespace.name, []))
            wanted, held[namespace.name] = plan(state, managed.get(namespace.name, {}), self.policy,
                                                snapshot.taken_at)
            changes += [(change, namespace.inode) for change in wanted]
        self._log_findings(snapshot, result, held)
        for change, inode in changes:
            self._act(change, inode)
        return snapshot, result, [change for change, _ in changes]

    def _act(self, change: Change, inode: int) -> None:
        why_not = refusal(change, self.policy, self.dry_run)
        fields = {"netns": change.netns, "sysctl": change.sysctl, "old": change.old, "new": change.new,
                  "reason": change.reason}
        if why_not:
            # The same recommendation comes every sweep while nothing writes it: say it once per
            # REMIND_AFTER, or when the value it asks for changes.
            key = (change.netns, change.sysctl)
            last = self.recommended.get(key)
            now = time.time()
            if last is None or last[0] != change.new or now - last[1] >= REMIND_AFTER:
                self.recommended[key] = (change.new, now)
                self.log.info(f"recommend {change.sysctl}={change.new} in netns {change.netns} "
                              f"(now {change.old}); not applied: {why_not}", **fields)
            return
        ref = netns.NamespaceRef(change.netns, inode, _path_of(change.netns, inode))
        try:
            sysctl.apply_change(self.ledger, ref, change.sysctl, change.old, change.new)
        except (OSError, netns.NamespaceGone) as exc:
            self.log.error(f"could not set {change.sysctl} in netns {change.netns}: {exc}", **fields)
            return
        self.log.warning(f"set {change.sysctl} {change.old} -> {change.new} in netns {change.netns}", **fields)
        if self.policy.apply.persist and change.netns == "host":
            try:
                persist.sync_host_file(self.ledger.entries, self.sysctl_d_file)
            except OSError as exc:
                self.log.error(f"could not persist to {self.sysctl_d_file}: {exc}; the change holds until reboot")

    def _log_findings(self, snapshot: Snapshot, result: Assessment, held: dict[str, list[Finding]]) -> None:
        """Log findings as they appear (and again every REMIND_AFTER), and say when they clear."""
        now = snapshot.taken_at
        active: set[tuple[str, str]] = set()
        for listener in snapshot.listeners:
            subject = f"{listener.netns} {listener.address}"
            findings = result.listener_findings.get((listener.netns, listener.cookie), [])
            active |= {(subject, f.id) for f in findings}
            self._log_new(subject, findings, now)
        for name in {*result.namespace_findings, *held}:
            findings = result.namespace_findings.get(name, []) + held.get(name, [])
            active |= {(f"netns {name}", f.id) for f in findings}
            self._log_new(f"netns {name}", findings, now)
        for subject, finding_id in set(self.logged) - active:
            if not finding_id.startswith(("cooldown", "at-max", "admin-override")):
                self.log.info(f"{subject}: {finding_id} cleared", finding=finding_id)
            del self.logged[(subject, finding_id)]

    def _log_new(self, subject: str, findings: list[Finding], now: float) -> None:
        for finding in findings:
            last = self.logged.get((subject, finding.id))
            if last is not None and now - last < REMIND_AFTER:
                continue
            self.logged[(subject, finding.id)] = now
            level = "info" if finding.id in ("syncookies-active", "cooldown", "at-max") else "warning"
            getattr(self.log, level)(finding.text, finding=finding.id, subject=subject, **finding.evidence)


def _path_of(name: str, inode: int) -> str:
    for ref in netns.list_namespaces():
        if ref.inode == inode:
            return ref.path
    raise netns.NamespaceGone(f"{name}: no longer exists")


def start_events(log: Any) -> EventLayer | None:
    """The eBPF layer, or None with the reason logged: aqtune then runs on the sweep alone."""
    try:
        layer = EventLayer.start(emit=EMIT_DROPS)
    except Unavailable as exc:
        log.warning(f"eBPF unavailable, running on sock_diag sweeps alone: {exc}", ebpf="unavailable")
        return None
    log.info(f"eBPF: {layer.mode}", ebpf="active", offsets=layer.offsets_from)
    for probe, state in layer.probes.items():
        if not state.startswith("attached"):
            log.warning(f"eBPF probe {probe} {state}", probe=probe)
    return layer


def run(runner: Runner, ebpf: bool = True) -> int:
    """Loop until SIGTERM or SIGINT; one failed sweep is logged and retried, not fatal."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if ebpf:
        runner.events = start_events(runner.log)
    mode = "dry-run" if runner.dry_run else runner.policy.mode
    runner.log.info(f"aqtune running: mode {mode}, policy {runner.policy.source}, netns {runner.select}, "
                    f"state {runner.ledger.state_dir}", mode=mode)
    if runner.policy.apply_refused:
        runner.log.warning(runner.policy.apply_refused)
    while not stop.is_set():
        started = time.monotonic()
        try:
            runner.tick()
        except (OSError, LookupError) as exc:
            runner.log.error(f"sweep failed: {exc}")
        stop.wait(max(runner.policy.interval - (time.monotonic() - started), 0.0))
    if runner.events:
        runner.events.close()
    runner.log.info("aqtune stopped")
    return 0

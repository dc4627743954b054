"""One tick of `aqtune run`: sweep, fold in eBPF events, judge, recommend or apply, and tell people.

The loop around it (timing, signals, systemd) is in daemon.py.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from aqtune.act import metrics, persist, state, sysctl
from aqtune.act.ledger import Ledger
from aqtune.act.log import MESSAGE_IDS
from aqtune.collect import netns, procfs
from aqtune.collect.ebpf import EMIT_DROPS, Event, EventLayer, Unavailable, unavailable_status
from aqtune.collect.sweep import sweep
from aqtune.decide.assess import Assessment, assess
from aqtune.decide.diagnose import Finding
from aqtune.decide.policy import Policy
from aqtune.decide.tuning import Change, NamespaceState, plan, refusal
from aqtune.model.episodes import ClosedEpisode, EpisodeTracker
from aqtune.model.history import Model
from aqtune.records import Listener, ListenerEvents, Snapshot
from aqtune.surfaces import status

REMIND_AFTER = 300.0  # seconds before a finding that persists is logged again
# The state file and metrics are rewritten every sweep, unless that costs over a tenth of the
# interval (at 10,000 listeners they are megabytes): then when what they show changes, else this often.
PUBLISH_EVERY = 5.0
RECENT_ACTIONS = 20


@dataclass(slots=True)
class Runner:
    policy: Policy
    select: str
    ledger: Ledger
    dry_run: bool
    log: Any
    state_dir: str | None = None
    model: Model = field(default_factory=Model)
    logged: dict[tuple[str, str], float] = field(default_factory=dict)  # (subject, finding id) -> when
    recommended: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)
    events: EventLayer | None = None
    ebpf_status: dict[str, Any] = field(default_factory=lambda: unavailable_status("not started"))
    sysctl_d_file: str = persist.SYSCTL_D_FILE
    owners: procfs.OwnerCache = field(default_factory=procfs.OwnerCache)
    episodes: EpisodeTracker = field(default_factory=EpisodeTracker)
    previous_events: dict[int, ListenerEvents] = field(default_factory=dict)
    peers: defaultdict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    listen_drops: deque[tuple[float, int]] = field(default_factory=deque)  # (when, ListenDrops summed)
    actions: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_ACTIONS))
    started: float = field(default_factory=time.time)
    last: dict[str, Any] | None = None  # the last status document
    degraded_at: dict[str, float] = field(default_factory=dict)  # what -> when last reported
    failed_writes: dict[tuple[str, str], float] = field(default_factory=dict)  # (netns, sysctl) -> when
    published: tuple[float, tuple[int, ...]] = (float("-inf"), ())  # when, and what it showed
    calm: bool = False  # every queue below clear_ratio at the last sweep
    publish_took: float = 0.0  # seconds the last state and metrics write took

    def start_events(self) -> None:
        """Load the eBPF layer, or say why aqtune runs on the sweep alone."""
        try:
            self.events = EventLayer.start(emit=EMIT_DROPS)
        except Unavailable as exc:
            self.ebpf_status = unavailable_status(f"unavailable: {exc}")
            self.log.warning(f"eBPF unavailable, running on sock_diag sweeps alone: {exc}",
                             message_id=MESSAGE_IDS["degraded"], ebpf="unavailable")
            return
        self.ebpf_status = self.events.status()
        self.events.on_event(self._remember_peer)
        self.log.info(f"eBPF: {self.events.mode}", ebpf="active", offsets=self.events.offsets_from)
        for probe, how in self.events.probes.items():
            if not how.attached:
                self.log.warning(f"eBPF probe {probe} {how}", message_id=MESSAGE_IDS["degraded"], probe=probe)

    def _remember_peer(self, event: Event) -> None:
        if event.peer is not None:
            peers = self.peers[event.inode]
            if len(peers) < 1000:  # a flood's worth is enough to name the top few
                peers.append(event.peer)

    def tick(self) -> tuple[Snapshot, Assessment, list[Change]]:
        snapshot = sweep(self.select, owner_cache=self.owners)
        pids = {p.pid for listener in snapshot.listeners for p in listener.processes}
        self.model.update(snapshot, procfs.cpu_seconds(pids))
        horizon = max([self.policy.saturation.sustain, *(r.sustain or 0 for r in self.policy.listeners)])
        self.model.forget_before(snapshot.taken_at - horizon - 2 * self.policy.interval)
        managed = {ns.name: self.ledger.managed(ns.inode) for ns in snapshot.namespaces}
        observed: dict[int, ListenerEvents] = {}
        if self.events:
            self.events.poll(0)
            observed = self.events.read()
            self.ebpf_status = self.events.status()
            self.events.forget_closed(observed.keys(), {listener.inode for listener in snapshot.listeners})
        requested = {inode: e.requested_backlog for inode, e in observed.items() if e.requested_backlog}
        result = assess(snapshot, self.model, self.policy, managed, requested=requested)
        for key, window in result.windows.items():
            self.model.listeners[key].saturated = window.saturated
        by_namespace = result.by_namespace(snapshot)
        changes: list[tuple[Change, int]] = []
        held: dict[str, list[Finding]] = {}
        for namespace in snapshot.namespaces:
            wanted, held[namespace.name] = plan(
                NamespaceState(namespace.name, namespace.sysctls, by_namespace.get(namespace.name, []),
                               result.namespace_findings.get(namespace.name, [])),
                managed.get(namespace.name, {}), self.policy, snapshot.taken_at)
            changes += [(change, namespace.inode) for change in wanted]
        for namespace in snapshot.namespaces:
            if namespace.error and not namespace.error.startswith("vanished"):
                self._degraded(f"netns {namespace.name}", f"netns {namespace.name} {namespace.error}")
        self._log_findings(snapshot, result, held)
        paths = {ns.inode: ns.path for ns in snapshot.namespaces}
        for change, inode in changes:
            self._act(change, inode, paths.get(inode, ""))
        self._log_drops(snapshot, observed, result)
        self.calm = all(l.fill < self.policy.saturation.clear_ratio for l in snapshot.listeners)
        self._publish(snapshot, result, observed)
        return snapshot, result, [change for change, _ in changes]

    # --- acting ---

    def _act(self, change: Change, inode: int, path: str) -> None:
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
                self.actions.append({**fields, "at": now, "applied": False, "why_not": why_not})
                self.log.info(f"recommend {change.sysctl}={change.new} in netns {change.netns} "
                              f"(now {change.old}); not applied: {why_not}",
                              message_id=MESSAGE_IDS["recommendation"], **fields)
            return
        key = (change.netns, change.sysctl)
        now = time.time()
        if now - self.failed_writes.get(key, float("-inf")) < REMIND_AFTER:
            return  # it failed a moment ago (read-only /proc/sys...): retrying every sweep only adds noise
        try:
            ref = netns.NamespaceRef(change.netns, inode, path)
            sysctl.apply_change(self.ledger, ref, change.sysctl, change.old, change.new)
        except (OSError, netns.NamespaceGone) as exc:
            self.failed_writes[key] = now
            self.log.error(f"could not set {change.sysctl} in netns {change.netns}: {exc}; "
                           f"next try in {REMIND_AFTER:.0f} s", message_id=MESSAGE_IDS["sysctl-change"], **fields)
            return
        self.failed_writes.pop(key, None)
        self.actions.append({**fields, "at": time.time(), "applied": True, "why_not": None})
        self.log.warning(f"set {change.sysctl} {change.old} -> {change.new} in netns {change.netns}: "
                         f"{change.reason}", message_id=MESSAGE_IDS["sysctl-change"], **fields)
        if self.policy.apply.persist and change.netns == "host":
            try:
                persist.sync_host_file(self.ledger.entries, self.sysctl_d_file)
            except OSError as exc:
                self.log.error(f"could not persist to {self.sysctl_d_file}: {exc}; the change holds until reboot")

    def rollback(self) -> None:
        for result in sysctl.rollback(self.ledger):
            self.log.warning(f"rollback {result.outcome}: netns {result.netns} {result.sysctl}: {result.detail}",
                             message_id=MESSAGE_IDS["rollback"], netns=result.netns, sysctl=result.sysctl,
                             outcome=result.outcome)

    # --- telling people ---

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
                self.log.info(f"{subject}: {finding_id} cleared", message_id=MESSAGE_IDS["finding"],
                              finding=finding_id)
            del self.logged[(subject, finding_id)]

    def _log_new(self, subject: str, findings: list[Finding], now: float) -> None:
        for finding in findings:
            last = self.logged.get((subject, finding.id))
            if last is not None and now - last < REMIND_AFTER:
                continue
            self.logged[(subject, finding.id)] = now
            level = "info" if finding.id in ("syncookies-active", "cooldown", "at-max") else "warning"
            getattr(self.log, level)(finding.text, message_id=MESSAGE_IDS["finding"], finding=finding.id,
                                     subject=subject, **finding.evidence)

    def _log_drops(self, snapshot: Snapshot, observed: dict[int, ListenerEvents], result: Assessment) -> None:
        """Feed each listener's new drops into its episode; log the episodes whose window closed."""
        tracker = self.episodes
        tracker.window, tracker.per_minute = self.policy.journal.window, self.policy.journal.max_per_minute
        by_key = {(l.netns, l.cookie): l for l in snapshot.listeners}
        for key, listener in by_key.items():
            drops = self._new_drops(listener, observed)
            if drops or key in tracker.open:
                tracker.observe(key, snapshot.taken_at, drops, listener.queue, listener.backlog,
                                self.peers.get(listener.inode))
        self.peers.clear()
        self.previous_events = observed
        for episode in tracker.close_due(snapshot.taken_at, set(by_key)):
            gone = by_key.get(episode.key)
            if gone is not None:
                self._log_episode(episode, gone, result.listener_findings.get(episode.key, []))

    def _new_drops(self, listener: Listener, observed: dict[int, ListenerEvents]) -> int:
        """Connections this listener dropped since the last sweep.

        The socket's drop counter counts an ACK-stage overflow twice; where eBPF counts those, each
        is counted once.
        """
        history = self.model.listeners.get((listener.netns, listener.cookie))
        if history is None or len(history.samples) < 2 or listener.drops is None:
            return 0
        before = history.samples[-2].drops
        drops = max(listener.drops - before, 0) if before is not None else 0
        now, then = observed.get(listener.inode), self.previous_events.get(listener.inode)
        if now is not None and then is not None:
            drops -= max(now.ack_overflow - then.ack_overflow, 0)
        return max(drops, 0)

    def _log_episode(self, episode: ClosedEpisode, listener: Listener, findings: list[Finding]) -> None:
        units = sorted({p.unit for p in listener.processes if p.unit})
        owner = f" ({', '.join(units)})" if units else (f" ({listener.processes[0].comm})" if listener.processes
                                                        else "")
        message = (f"{listener.address}{owner} dropped {episode.drops} connection"
                   f"{'s' if episode.drops != 1 else ''} in {max(episode.seconds, 1):.0f} s: accept queue full "
                   f"{episode.peak_queue}/{episode.backlog}")
        if episode.top_peers:
            message += "; clients hurt: " + ", ".join(f"{peer} ({n})" for peer, n in episode.top_peers)
        advice = next((f for f in findings if f.id not in ("saturated",)), None)
        if advice is not None:
            message += f"; {advice.id}: {advice.text.split(': ', 1)[-1]}"
        if episode.suppressed:
            message += f" ({episode.suppressed} entries suppressed by the rate limit before this one)"
        (self.log.error if episode.sustained else self.log.warning)(
            message, message_id=MESSAGE_IDS["drops"], listener=listener.address, netns=listener.netns,
            unit=",".join(units) or None, pid=listener.processes[0].pid if listener.processes else None,
            drops=episode.drops, queue=episode.peak_queue, backlog=episode.backlog, seconds=round(episode.seconds, 1),
            peers=",".join(p for p, _ in episode.top_peers) or None, suppressed=episode.suppressed or None,
        )

    def _publish(self, snapshot: Snapshot, result: Assessment, observed: dict[int, ListenerEvents]) -> None:
        """The state `aqtune status` shows while the daemon runs, and the metrics file."""
        total = sum(ns.counters.get("ListenDrops", 0) for ns in snapshot.namespaces)
        self.listen_drops.append((snapshot.taken_at, total))
        while len(self.listen_drops) > 1 and snapshot.taken_at - self.listen_drops[1][0] >= 60:
            self.listen_drops.popleft()
        shown = (len(snapshot.listeners), sum(l.queue for l in snapshot.listeners),
                 sum(l.drops or 0 for l in snapshot.listeners), total, len(result.listener_findings),
                 len(self.actions), sum(observed[l.inode].enqueued for l in snapshot.listeners if l.inode in observed))
        costly = self.publish_took > 0.1 * self.policy.interval
        if costly and shown == self.published[1] and snapshot.taken_at - self.published[0] < PUBLISH_EVERY:
            return
        self.published = (snapshot.taken_at, shown)
        started = time.monotonic()
        document = status.snapshot_json(snapshot, result, observed, self.ebpf_status, source="daemon")
        for listener in document["listeners"]:
            window = result.windows.get((listener["netns"], listener["cookie"]))
            if window is not None:
                listener["history"] = {"peak_fill": round(window.peak_fill, 4), "saturated": window.saturated,
                                       "high_for": round(window.high_for, 1), "drops_in_window": window.drops}
        document["daemon"] = {
            "pid": os.getpid(), "started": self.started, "interval": self.policy.interval,
            "publish_every": PUBLISH_EVERY,
            "mode": "dry-run" if self.dry_run else self.policy.mode, "policy": self.policy.source,
            "drops_last_minute": max(total - self.listen_drops[0][1], 0),
            "journal_suppressed": self.episodes.suppressed_total, "actions": list(self.actions),
        }
        self.last = document
        if self.state_dir:
            try:
                state.write_state(self.state_dir, document)
            except OSError as exc:
                self._degraded("state", f"cannot write state to {self.state_dir}: {exc.strerror}; "
                               "`aqtune status` will sweep on its own")
        if self.policy.metrics.textfile:
            try:
                metrics.write(self.policy.metrics.textfile, document, self.episodes.suppressed_total)
            except FileNotFoundError:
                # No node_exporter textfile directory: nothing collects the file, which is a choice,
                # not a fault; said once.
                if "metrics" not in self.degraded_at:
                    self.degraded_at["metrics"] = time.time()
                    self.log.info(f"metrics not written: no directory for {self.policy.metrics.textfile} "
                                  "(install prometheus-node-exporter, or set [metrics] textfile)")
            except OSError as exc:
                self._degraded("metrics", f"cannot write {self.policy.metrics.textfile}: {exc.strerror}")
        self.publish_took = time.monotonic() - started

    def _degraded(self, what: str, text: str) -> None:
        # Once per REMIND_AFTER, not every sweep: a read-only disk should not flood the journal.
        now = time.time()
        if now - self.degraded_at.get(what, 0.0) >= REMIND_AFTER:
            self.degraded_at[what] = now
            self.log.error(text, message_id=MESSAGE_IDS["degraded"], component=what)

    def quiet(self) -> bool:
        """Nothing to watch closely: no finding, no drop episode under way, every queue short."""
        return self.calm and not self.episodes.open and not self.logged

    def summary(self) -> str:
        """The one line systemd shows as the service's status."""
        document = self.last
        if document is None:
            return "starting"
        listeners = document["listeners"]
        worst = listeners[0] if listeners else None
        worst_text = f"worst fill {worst['fill']:.2f} ({worst['address']})" if worst else "no listeners"
        ebpf = document["ebpf"]
        ebpf_text = ("eBPF " + ebpf["mode"].split(":")[0]) if ebpf["active"] else "eBPF off"
        return (f"watching {len(listeners)} listeners in {len(document['namespaces'])} netns; {worst_text}; "
                f"{document['daemon']['drops_last_minute']} drops in the last minute; "
                f"mode {document['daemon']['mode']}; {ebpf_text}")


"""Telling the journal: findings as they appear and clear, drop episodes as their windows close.

Both are rate limited in two pools, system listeners (owned by a system user: services) and users'
listeners, each with a per-listener share: a local user with a thousand saturated sockets can fill
only the users' pool, never silence a service's entries.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from aqtune.act.log import EventLog
from aqtune.act.throttle import Budget, Throttle
from aqtune.decide.findings import SPECS, Finding, FindingId, Level
from aqtune.decide.policy import JournalPolicy
from aqtune.decide.tick import Decision
from aqtune.messages import MessageId
from aqtune.model.episodes import ClosedEpisode, EpisodeTracker
from aqtune.model.history import Model
from aqtune.records import Listener, ListenerEvents, Snapshot

REMIND_AFTER = 300.0  # seconds before a finding that persists is logged again
SYSTEM_UID_MAX = 999  # Debian's SYS_UID_MAX: uids above it are people's
MAX_PEERS = 1000  # per listener per sweep: a flood's worth is enough to name the top few
MAX_PEERS_TOTAL = 20_000  # per sweep, all listeners together: a flood at thousands of listeners is bounded too


def pool_of(uid: int | None) -> str:
    return "system" if uid is None or uid <= SYSTEM_UID_MAX else "users"


@dataclass(slots=True)
class Pools:
    """One Budget per pool, sized from the policy's [journal] max_per_minute."""

    per_minute: int
    budgets: dict[str, Budget[object]] = field(default_factory=dict)
    suppressed: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # since the last entry let through
    suppressed_total: int = 0

    def allow(self, uid: int | None, source: object, now: float) -> tuple[bool, int]:
        """Whether an entry from ``source`` may go out now, and how many of its pool's were held
        back since the last one that did."""
        pool = pool_of(uid)
        budget = self.budgets.get(pool)
        if budget is None or budget.per_minute != self.per_minute:
            budget = self.budgets[pool] = Budget(self.per_minute, max(self.per_minute // 4, 1))
        if not budget.allow((source,), now):
            self.suppressed[pool] += 1
            self.suppressed_total += 1
            return False, 0
        held, self.suppressed[pool] = self.suppressed[pool], 0
        return True, held


@dataclass(slots=True)
class FindingReporter:
    log: EventLog
    logged: Throttle[tuple[str, FindingId]] = field(default_factory=lambda: Throttle(REMIND_AFTER))
    pools: Pools = field(default_factory=lambda: Pools(60))
    # Whose each subject is: its "cleared" entry is charged to the same pool as its findings were.
    owners: dict[str, int | None] = field(default_factory=dict)

    def report(self, snapshot: Snapshot, decision: Decision, policy: JournalPolicy) -> None:
        """Log findings as they appear (and again every REMIND_AFTER), and say when they clear."""
        now = snapshot.taken_at
        self.pools.per_minute = 2 * policy.max_per_minute
        active: set[tuple[str, FindingId]] = set()
        for listener in snapshot.listeners:
            findings = decision.assessment.listener_findings.get((listener.netns, listener.cookie))
            if findings:
                subject = f"{listener.netns} {listener.address}"
                active |= {(subject, f.id) for f in findings}
                self._say(subject, listener.uid, findings, now)
        # A namespace a user namespace owns is that user's: its findings come out of the users' pool.
        namespace_owner = {ns.name: ns.owner_uid if ns.user_owned else None for ns in snapshot.namespaces}
        for name in {*decision.assessment.namespace_findings, *decision.held}:
            findings = decision.namespace_findings(name)
            active |= {(f"netns {name}", f.id) for f in findings}
            self._say(f"netns {name}", namespace_owner.get(name), findings, now)
        for subject, finding_id in self.logged.keys() - active:
            self.logged.forget((subject, finding_id))
            uid = self.owners.get(subject)
            if not SPECS[finding_id].held_back and self.pools.allow(uid, subject, now)[0]:
                self.log.info(f"{subject}: {finding_id} cleared", MessageId.FINDING, finding=finding_id)
        still = {subject for subject, _ in self.logged.said}
        for subject in self.owners.keys() - still:
            del self.owners[subject]

    def _say(self, subject: str, uid: int | None, findings: list[Finding], now: float) -> None:
        for finding in findings:
            key = (subject, finding.id)
            if self.logged.holds(key, now) or not self.pools.allow(uid, subject, now)[0]:
                continue  # said lately, or over budget: due again at the next sweep
            self.logged.due(key, now)
            self.owners[subject] = uid
            spec = finding.spec
            fields = {k: v for k, v in finding.evidence.items()}
            if spec.level is Level.INFO:
                self.log.info(finding.text, spec.message_id, finding=str(finding.id), subject=subject, **fields)
            else:
                self.log.warning(finding.text, spec.message_id, finding=str(finding.id), subject=subject, **fields)

    @property
    def quiet(self) -> bool:
        return not self.logged


@dataclass(slots=True)
class DropReporter:
    """Drops per listener gathered into episodes, one journal entry per episode window."""

    log: EventLog
    episodes: EpisodeTracker = field(default_factory=EpisodeTracker)
    pools: Pools = field(default_factory=lambda: Pools(30))
    peers: defaultdict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    previous_events: Mapping[int, ListenerEvents] = field(default_factory=dict)
    peers_held: int = 0  # in ``peers``, all listeners together

    def remember_peer(self, inode: int, peer: str) -> None:
        if self.peers_held >= MAX_PEERS_TOTAL:
            return
        peers = self.peers[inode]
        if len(peers) < MAX_PEERS:
            peers.append(peer)
            self.peers_held += 1

    @property
    def suppressed_total(self) -> int:
        return self.pools.suppressed_total

    def report(self, snapshot: Snapshot, model: Model, events: Mapping[int, ListenerEvents],
               decision: Decision, policy: JournalPolicy) -> None:
        """Feed each listener's new drops into its episode; log the episodes whose window closed."""
        tracker = self.episodes
        tracker.window, self.pools.per_minute = policy.window, policy.max_per_minute
        by_key = {(l.netns, l.cookie): l for l in snapshot.listeners}
        histories = model.listeners
        for key, listener in by_key.items():
            history = histories.get(key)
            if history is not None and history.repeated and key not in tracker.open:
                continue  # its last two samples show the same figures: no new drop, no episode to feed
            drops = self._new_drops(listener, model, events)
            if drops or key in tracker.open:
                tracker.observe(key, snapshot.taken_at, drops, listener.queue, listener.backlog,
                                self.peers.get(listener.inode))
        self.peers.clear()
        self.peers_held = 0
        self.previous_events = events
        for episode in tracker.close_due(snapshot.taken_at, set(by_key)):
            present = by_key.get(episode.key)
            if present is None:
                continue
            allowed, held = self.pools.allow(present.uid, episode.key, snapshot.taken_at)
            if allowed:
                self._say(episode, present, decision.assessment.listener_findings.get(episode.key, []), held)

    def _new_drops(self, listener: Listener, model: Model, events: Mapping[int, ListenerEvents]) -> int:
        """Connections this listener dropped since the last sweep.

        The socket's drop counter counts an ACK-stage overflow twice; where eBPF counts those, each
        is counted once.
        """
        history = model.listeners.get((listener.netns, listener.cookie))
        if history is None or len(history.samples) < 2 or listener.drops is None:
            return 0
        before = history.samples[-2].drops
        drops = max(listener.drops - before, 0) if before is not None else 0
        now, then = events.get(listener.inode), self.previous_events.get(listener.inode)
        if now is not None and then is not None:
            drops -= max(now.ack_overflow - then.ack_overflow, 0)
        return max(drops, 0)

    def _say(self, episode: ClosedEpisode, listener: Listener, findings: list[Finding], suppressed: int) -> None:
        units = sorted({p.unit for p in listener.processes if p.unit})
        owner = f" ({', '.join(units)})" if units else (f" ({listener.processes[0].comm})" if listener.processes
                                                        else "")
        # Said as it is: a dropped SYN or handshake ACK is retried by the client (after 1, 3, 7 s), so
        # these are connection attempts that stalled, not connections lost.
        message = (f"{listener.address}{owner} dropped {episode.drops} connection attempt"
                   f"{'s' if episode.drops != 1 else ''} in {max(episode.seconds, 1):.0f} s: accept queue full "
                   f"{episode.peak_queue}/{episode.backlog}; clients retry after 1, 3, 7 s, so they stall "
                   "rather than fail unless they give up")
        if episode.top_peers:
            message += (f"; {episode.clients} distinct client{'s' if episode.clients != 1 else ''}: "
                        + ", ".join(f"{peer} ({n})" for peer, n in episode.top_peers))
        advice = next((f for f in findings if f.spec.advises), None)
        if advice is not None:
            message += f"; {advice.id}: {advice.text.split(': ', 1)[-1]}"
        if suppressed:
            message += f" ({suppressed} entries suppressed by the rate limit before this one)"
        (self.log.error if episode.sustained else self.log.warning)(
            message, MessageId.DROPS, listener=listener.address, netns=listener.netns,
            unit=",".join(units) or None, pid=listener.processes[0].pid if listener.processes else None,
            drops=episode.drops, queue=episode.peak_queue, backlog=episode.backlog, seconds=round(episode.seconds, 1),
            peers=",".join(p for p, _ in episode.top_peers) or None, clients=episode.clients or None,
            suppressed=suppressed or None,
        )

    @property
    def quiet(self) -> bool:
        return not self.episodes.open


@dataclass(slots=True)
class DegradedReporter:
    """A part of aqtune that cannot run (a namespace, the state file, metrics): said once per
    REMIND_AFTER per part, so a read-only disk does not flood the journal."""

    log: EventLog
    said: Throttle[str] = field(default_factory=lambda: Throttle(REMIND_AFTER))
    noticed: Throttle[str] = field(default_factory=lambda: Throttle(float("inf")))

    def __call__(self, what: str, text: str, now: float) -> None:
        if self.said.due(what, now, text):
            self.log.error(text, MessageId.DEGRADED, component=what)

    def notice(self, what: str, text: str, now: float) -> None:
        """A choice rather than a fault (no metrics directory): said once, at info, apart from the
        errors of the same part."""
        if self.noticed.due(what, now):
            self.log.info(text, MessageId.DEGRADED, component=what)

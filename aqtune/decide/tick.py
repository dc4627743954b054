"""The decision half of one tick: a snapshot, what eBPF saw, the history, the policy and what aqtune
already changed, in; findings and the sysctl changes they call for, out. Pure.

The daemon (surfaces/run.py), one-shot `aqtune status` and the property tests all call ``decide``,
so what the daemon does and what the tests prove are the same code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from aqtune.decide.assess import assess
from aqtune.decide.findings import Assessment, Finding, FindingId
from aqtune.decide.policy import Policy, may_be_judged, owner_allowed
from aqtune.decide.tuning import Change, NamespaceState, plan
from aqtune.model.history import ListenerKey, ListenerWindow, Model
from aqtune.records import ConnectionSummary, ListenerEvents, Managed, Snapshot


@dataclass(frozen=True, slots=True)
class Planned:
    """A change and the namespace (by inode) it is for."""

    change: Change
    netns_inode: int


@dataclass(slots=True)
class Decision:
    assessment: Assessment
    changes: list[Planned] = field(default_factory=list)
    held: dict[str, list[Finding]] = field(default_factory=dict)  # netns -> why a wanted change waits

    @property
    def judged(self) -> dict[ListenerKey, ListenerWindow]:
        """Each judged listener's window, for the state the model keeps (hysteresis, onset, worst burst)."""
        return self.assessment.windows

    def namespace_findings(self, name: str) -> list[Finding]:
        return self.assessment.namespace_findings.get(name, []) + self.held.get(name, [])


def history_horizon(policy: Policy) -> float:
    """Seconds of history the longest window needs, with two intervals of margin for its baseline."""
    longest = max([policy.saturation.sustain, *(rule.sustain or 0.0 for rule in policy.listeners)])
    return longest + 2 * policy.interval


def decide(snapshot: Snapshot, events: Mapping[int, ListenerEvents], model: Model, policy: Policy,
           managed: Mapping[int, dict[str, Managed]], one_shot: bool = False,
           connections: Mapping[ListenerKey, ConnectionSummary] | None = None,
           serving: Mapping[int, Iterable[int]] | None = None) -> Decision:
    """Judge ``snapshot`` against ``policy`` with ``model``'s history (already updated with it).

    ``events`` maps socket inodes to what eBPF saw; ``managed`` maps namespace inodes to what aqtune
    changed there (the ledger); ``connections`` the summaries of saturated listeners' connections and
    ``serving`` which pids accept on which listener inode, where they were looked at. A one-shot
    decision has one sample, so "sustained" means "now".
    """
    by_name = {ns.name: managed.get(ns.inode, {}) for ns in snapshot.namespaces}
    requested = {inode: e.requested_backlog for inode, e in events.items() if e.requested_backlog}
    assessment = assess(snapshot, model, policy, by_name, one_shot=one_shot, requested=requested, events=events,
                        connections=connections, serving=serving)
    decision = Decision(assessment)
    trusted, untrusted = _by_rights(snapshot, assessment, policy)
    for namespace in snapshot.namespaces:
        state = NamespaceState(namespace.name, namespace.sysctls, trusted.get(namespace.name, []),
                               assessment.namespace_findings.get(namespace.name, []))
        wanted, held = plan(state, by_name[namespace.name], policy, snapshot.taken_at)
        decision.changes += [Planned(change, namespace.inode) for change in wanted]
        held += untrusted.get(namespace.name, [])
        if held:
            decision.held[namespace.name] = held
    return decision


def _by_rights(snapshot: Snapshot, assessment: Assessment,
               policy: Policy) -> tuple[dict[str, list[Finding]], dict[str, list[Finding]]]:
    """Listener findings by namespace, split by whether the policy lets their owner's trouble change a
    sysctl; for the others, a finding saying why not. A local user's socket must never decide what
    root changes."""
    user_owned = {ns.name: ns.user_owned for ns in snapshot.namespaces}
    trusted: dict[str, list[Finding]] = {}
    untrusted: dict[str, list[Finding]] = {}
    for listener in snapshot.listeners:
        found = assessment.listener_findings.get((listener.netns, listener.cookie))
        if not found:
            continue
        # Only units the host's system manager runs count; a user's or a container's are named by them.
        units = sorted({p.unit for p in listener.processes if p.unit and p.container is None})
        why_not = owner_allowed(policy, listener.uid, units, user_owned.get(listener.netns, False))
        if why_not is None:
            trusted.setdefault(listener.netns, []).extend(found)
        elif any(f.spec.drives_tuning for f in found):
            untrusted.setdefault(listener.netns, []).append(Finding(
                FindingId.OWNER_UNTRUSTED, f"netns {listener.netns}: {listener.address} is {why_not}; aqtune "
                "changes no sysctl for it", {"listener": listener.address, "uid": listener.uid}))
    return trusted, untrusted


def one_shot(snapshot: Snapshot, policy: Policy, managed: Mapping[int, dict[str, Managed]],
             events: Mapping[int, ListenerEvents] | None = None) -> Decision:
    """What a single snapshot supports: fill now rather than sustained, no drop or counter rates."""
    model = Model()
    model.update(replace(snapshot, listeners=may_be_judged(snapshot, policy, managed, events)), {}, events)
    return decide(snapshot, events or {}, model, policy, managed, one_shot=True)

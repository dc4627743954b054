"""From a snapshot and its history to findings for every listener and namespace (no side effects)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from aqtune.decide import servers
from aqtune.decide.connections import held_by_connections, reuseport_stalled
from aqtune.decide.diagnose import Raised, diagnose_listener, diagnose_namespace, queue_wait_ms
from aqtune.decide.findings import Assessment, Finding
from aqtune.decide.policy import ListenerRule, Policy, rule_for
from aqtune.decide.tuning import SOMAXCONN
from aqtune.model.groups import GroupKey, reuseport_groups
from aqtune.model.history import ListenerKey, Model, counter_deltas, listener_window
from aqtune.records import ConnectionSummary, Listener, ListenerEvents, Managed, Snapshot


def assess(snapshot: Snapshot, model: Model, policy: Policy, managed: dict[str, dict[str, Managed]],
           one_shot: bool = False, requested: dict[int, int] | None = None,
           events: Mapping[int, ListenerEvents] | None = None,
           connections: Mapping[ListenerKey, ConnectionSummary] | None = None,
           serving: Mapping[int, Iterable[int]] | None = None) -> Assessment:
    """Judge every listener of ``snapshot`` against ``policy`` using ``model``'s history.

    ``managed`` maps namespace names to what aqtune changed there; ``requested`` maps socket inodes
    to the backlog the application passed to listen(), where eBPF saw it. A one-shot assessment has
    a single sample, so "sustained" means "now".
    """
    result = Assessment()
    groups: dict[GroupKey, list[Listener]] | None = None  # made when a listener is first found saturated
    somaxconn = {ns.name: ns.sysctls.get(SOMAXCONN) for ns in snapshot.namespaces}
    for listener in snapshot.listeners:
        key = (listener.netns, listener.cookie)
        history = model.listeners.get(key)
        if history is None or not history.samples:
            continue
        rule = _rule(policy, listener)
        if rule is not None and rule.ignore:
            result.ignored.add(key)
            continue
        fill_ratio = rule.fill_ratio if rule and rule.fill_ratio is not None else policy.saturation.fill_ratio
        sustain = rule.sustain if rule and rule.sustain is not None else policy.saturation.sustain
        clear_ratio = min(policy.saturation.clear_ratio, fill_ratio)
        record = managed.get(listener.netns, {}).get(SOMAXCONN)
        samples = history.samples
        # Most listeners are quiet: below the threshold, not saturated, no drop in all the history
        # kept (which covers the window), nothing aqtune changed that they might wait on. They can
        # have no finding, so the window is not worked out for them.
        seen = (events or {}).get(listener.inode)
        wait_ms = queue_wait_ms(seen)
        if (record is None and not history.saturated and samples[-1].fill < fill_ratio
                and samples[-1].drops == samples[0].drops
                and (wait_ms is None or wait_ms <= policy.saturation.max_queue_wait_ms)):
            continue
        window = listener_window(history.samples, history.saturated, fill_ratio, clear_ratio,
                                 0.0 if one_shot else sustain, history.since, history.worst_burst)
        result.windows[key] = window
        raised = Raised(record.original, record.applied, record.earlier) if record else None
        causes: list[Finding] = []
        if window.saturated:
            # What keeps the queue from draining, where the connections show it: a stuck reuseport
            # sibling, or workers all held by long or idle connections.
            if groups is None:
                groups = reuseport_groups(snapshot.listeners)
            group = groups.get((listener.netns, listener.proto, listener.address))
            stuck = reuseport_stalled(listener, group, policy, serving) if group else None
            summary = (connections or {}).get(key)
            held = (held_by_connections(listener, summary, servers.identify(listener.processes), policy)
                    if summary is not None and stuck is None else None)
            causes = [f for f in (stuck, held) if f is not None]
        findings = diagnose_listener(listener, window, somaxconn.get(listener.netns),
                                     (requested or {}).get(listener.inode), raised, policy,
                                     seen, clear_ratio, causes)
        if findings:
            result.listener_findings[key] = findings
    for namespace in snapshot.namespaces:
        counters = model.namespaces.get(namespace.name)
        if not counters or len(counters) < 2:
            continue
        deltas = counter_deltas(counters, policy.saturation.sustain)
        findings = diagnose_namespace(namespace.name, namespace.sysctls, deltas)
        if findings:
            result.namespace_findings[namespace.name] = findings
    return result


def _rule(policy: Policy, listener: Listener) -> ListenerRule | None:
    if not policy.listeners:
        return None
    comms = tuple(p.comm for p in listener.processes)
    units = tuple(p.unit for p in listener.processes if p.unit)
    return rule_for(policy, listener.netns, listener.address, listener.port, comms, units)

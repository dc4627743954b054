"""What is wrong with a listener or a namespace, and what fixes it: pure functions of the model.

Each finding has a stable ``id`` scripts can key on, one line of ``text`` for a person, and the
figures it was based on. The effective backlog is min(listen() backlog, somaxconn at that call), and
a raised somaxconn reaches a listener only when it calls listen() again, so advice names the owning
process, its unit and its own knob.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import Enum

from aqtune.decide import servers
from aqtune.decide.findings import Finding, FindingId
from aqtune.decide.policy import Policy
from aqtune.model.history import ListenerWindow
from aqtune.records import Listener, ListenerEvents, Process

STALLED_CPU_SHARE = 0.05  # owners using less than 5% of a core while their queue is full


@dataclass(frozen=True, slots=True)
class Raised:
    """A somaxconn value aqtune set in a namespace, and the values it replaced."""

    original: int
    applied: int
    earlier: tuple[int, ...] = ()  # values aqtune wrote before ``applied``


def owner_label(processes: tuple[Process, ...]) -> str:
    if not processes:
        return "its owner (no process found holding the socket)"
    first = processes[0]
    label = f"{first.comm} (pid {first.pid}"
    if len(processes) > 1:
        label += f" and {len(processes) - 1} more"
    units = sorted({p.unit for p in processes if p.unit})
    return label + (f", {', '.join(units)})" if units else ")")


def _relisten_action(processes: tuple[Process, ...]) -> str:
    return servers.relisten_action(processes)


def app_knob(processes: tuple[Process, ...], backlog: int) -> str:
    """How the owning program sets its listen() backlog: its server's knob, from the server table."""
    return servers.app_knob(processes, backlog)


HEADROOM = 1.25  # over the worst burst seen: the next one is rarely exactly as large


@dataclass(frozen=True, slots=True)
class Sizing:
    """The one backlog number aqtune recommends for a listener, and what it was computed from."""

    number: int
    basis: str


def _power_of_two(n: float) -> int:
    return 1 << max(math.ceil(math.log2(max(n, 1.0))), 0)


def recommended_backlog(listener: Listener, window: ListenerWindow, policy: Policy,
                        wait_ms: float | None = None) -> Sizing | None:
    """The worst burst seen (peak queue plus the SYNs dropped in the sweep that saw the most), with
    headroom, rounded up to a power of two; bounded by what the workers drain at their fastest measured
    accept rate within ``max_queue_wait_ms``, and by the policy's max. Always more than the backlog
    now; None when the workers cannot drain even the queue they have within that time (then they,
    not the queue, are the limit). The drain rate is the busiest sweep's accepts or, where eBPF timed
    the waits, the peak queue over the longest wait, whichever is higher."""
    peak = max(window.peak_queue, listener.queue)
    dropped = window.burst_drops or 0
    burst = peak + dropped
    if window.worst_burst > burst:
        burst = window.worst_burst
        basis = f"the worst burst of this saturation: {burst} queued and dropped in one sweep"
    else:
        basis = f"the worst burst seen: {peak} queued + {dropped} dropped in one sweep = {burst}"
    number = _power_of_two(burst * HEADROOM)
    basis += f", +{(HEADROOM - 1) * 100:.0f}% headroom, rounded up to a power of two"
    rate = window.peak_accept_rate
    if wait_ms is not None and wait_ms > 0 and peak > 0:
        # A full queue emptied within the wait its last connection saw: a drain rate arrivals do not
        # limit, unlike the accepts counted (bursty load leaves the workers idle in between).
        rate = max(rate or 0.0, peak / (wait_ms / 1000))
    if rate is not None and rate > 0:
        drains = rate * policy.saturation.max_queue_wait_ms / 1000
        if drains <= listener.backlog:
            return None  # the workers cannot drain even today's queue in time: a longer one only waits
        if number > drains:
            number = max(_power_of_two(drains + 1) // 2, listener.backlog + 1)  # the power of two <= drains
            basis += (f"; bounded by what the workers drain at their fastest ({rate:.0f} accepts/s) within "
                      f"max_queue_wait_ms ({policy.saturation.max_queue_wait_ms:g} ms)")
    number = max(number, listener.backlog + 1)
    if number > policy.somaxconn.max:
        number = policy.somaxconn.max
        basis += f"; capped at the policy's max ({policy.somaxconn.max})"
    return Sizing(number, basis)


def suggested_backlog(listener: Listener, policy: Policy) -> int:
    """The backlog for a listener known only by one sample (no window): one policy step up."""
    grown = int(listener.backlog * policy.somaxconn.step)
    return min(max(grown, policy.somaxconn.min, listener.backlog + 1), policy.somaxconn.max)


class Factor(Enum):
    """What limits a saturated listener: said once, and only its own remedy."""

    STALLED = "stalled"  # the workers stopped accepting
    BUSY = "busy"  # the workers accept, but cannot keep up: the queue never drains
    SLOW = "slow"  # connections wait longer than max_queue_wait_ms: the workers are the limit
    BURSTS = "bursts"  # the queue drains between bursts it cannot hold: a longer queue helps
    SNAPSHOT = "snapshot"  # one sample: no trend to judge


def queue_wait_ms(events: ListenerEvents | None) -> float | None:
    """How long connections wait in the queue: the oldest still queued, else the accepted p99."""
    if events is None:
        return None
    waits = [w for w in (events.oldest_queued_ms, (events.queue_wait_ms or {}).get("p99")) if w is not None]
    return max(waits) if waits else None


def limiting_factor(window: ListenerWindow, clear_ratio: float, wait_ms: float | None, policy: Policy) -> Factor:
    if window.span == 0:
        return Factor.SNAPSHOT
    drained = window.min_fill < clear_ratio
    if window.accepts is not None:
        if window.accepts == 0 and not drained:
            return Factor.STALLED
    elif not drained and window.cpu_share is not None and window.cpu_share < STALLED_CPU_SHARE:
        return Factor.STALLED
    if wait_ms is not None and wait_ms > policy.saturation.max_queue_wait_ms:
        return Factor.SLOW
    return Factor.BURSTS if drained else Factor.BUSY


def _since(window: ListenerWindow) -> str:
    if window.since is None:
        return ""
    return " since " + time.strftime("%H:%M:%S", time.localtime(window.since))


def diagnose_listener(listener: Listener, window: ListenerWindow, somaxconn: int | None,
                      requested: int | None, raised: Raised | None, policy: Policy,
                      events: ListenerEvents | None = None, clear_ratio: float | None = None,
                      causes: list[Finding] | None = None) -> list[Finding]:
    """Findings for one listener: its state, then the one limiting factor with its own remedy.

    Only a queue too short for bursts its workers drain gets backlog advice (and only that advice can
    lead to a sysctl change); stalled, busy or slow workers get the server's worker knob. A listener
    still waiting to call listen() again after aqtune raised somaxconn is told so, even when idle.
    ``causes`` are what the listener's connections show keeps the queue from draining (a stuck
    reuseport sibling, workers held by long connections): where one holds, it is the limiting factor.
    """
    owner = owner_label(listener.processes)
    server = servers.identify(listener.processes)
    findings: list[Finding] = []
    wait_ms = queue_wait_ms(events)
    factor = limiting_factor(window, policy.saturation.clear_ratio if clear_ratio is None else clear_ratio,
                             wait_ms, policy)
    # Where eBPF saw the listen() call, a listener that asked for no more than it has is not waiting
    # for a re-listen.
    relisten = (raised is not None and listener.backlog < raised.applied
                and listener.backlog in (raised.original, *raised.earlier)
                and (requested is None or requested > listener.backlog))
    if window.saturated:
        drops = f", {window.drops} dropped connection attempts (clients retry them)" if window.drops else ""
        if factor is Factor.SNAPSHOT:
            when = ("now (one sample: a snapshot, not a trend; the daemon judges over time)"
                    + (f", {listener.drops} drops since it started listening" if listener.drops else ""))
        elif factor is Factor.BURSTS:
            when = f"in bursts{_since(window)}: the queue drains between them{drops}"
        else:
            when = f"persistently{_since(window)}, full for {window.high_for:.0f} s{drops}"
        findings.append(Finding(
            FindingId.SATURATED,
            f"{listener.address}: accept queue saturated, {listener.queue}/{listener.backlog} "
            f"(fill {window.fill:.2f}, peak {window.peak_fill:.2f}) {when}",
            {"queue": listener.queue, "backlog": listener.backlog, "fill": round(window.fill, 4),
             "peak_fill": round(window.peak_fill, 4), "high_for": round(window.high_for, 1),
             "drops": window.drops, "since": window.since, "pattern": factor.value},
        ))
    if relisten and raised is not None:
        findings.append(Finding(
            FindingId.RELISTEN_NEEDED,
            f"{listener.address}: somaxconn was raised from {raised.original} to {raised.applied} but this "
            f"listener still has backlog {listener.backlog}; {owner} must call listen() again: "
            + _relisten_action(listener.processes),
            {"backlog": listener.backlog, "somaxconn": somaxconn, "raised_from": raised.original},
        ))
    workers = servers.worker_knob_text(server)
    if window.saturated and factor is not Factor.SNAPSHOT and not relisten and causes:
        stuck = [f for f in causes if f.id is FindingId.REUSEPORT_STALLED]
        if stuck or factor is not Factor.BURSTS:
            return findings + (stuck or causes)
    if factor is Factor.SLOW and (window.saturated or not relisten):
        findings.append(Finding(
            FindingId.QUEUE_WAIT,
            f"{listener.address}: connections wait {(wait_ms or 0.0) / 1000:.1f} s in the accept queue (over "
            f"max_queue_wait_ms, {policy.saturation.max_queue_wait_ms:g} ms): {owner}'s workers are the limit, "
            f"not the queue; a longer queue would only lengthen the wait: {workers}",
            {"wait_ms": round(wait_ms or 0.0, 1), "max_queue_wait_ms": policy.saturation.max_queue_wait_ms},
        ))
        return findings
    if relisten or not window.saturated or factor is Factor.SNAPSHOT:
        return findings
    if factor is Factor.STALLED:
        how = (f"accepted nothing for {window.span:.0f} s" if window.accepts == 0
               else f"uses {(window.cpu_share or 0) * 100:.1f}% of a CPU")
        findings.append(Finding(
            FindingId.STALLED_WORKERS,
            f"{listener.address}: the queue stays full while {owner} {how}: its workers are blocked (on an "
            "upstream, a lock or I/O) or too few; a longer queue adds only latency: fix the workers first "
            f"({workers})",
            {"cpu_share": None if window.cpu_share is None else round(window.cpu_share, 4),
             "accepts": window.accepts},
        ))
        return findings
    if factor is Factor.BUSY:
        rate = window.accept_rate
        pace = f"accepts {rate:.0f}/s" if rate is not None else "keeps accepting"
        cpu = f" using {window.cpu_share * 100:.0f}% of a CPU" if window.cpu_share is not None else ""
        findings.append(Finding(
            FindingId.WORKERS_SATURATED,
            f"{listener.address}: the queue never drains: {owner} {pace}{cpu} but more arrive; the workers "
            f"cannot keep up and a longer queue only adds latency: add capacity ({workers})",
            {"accept_rate": None if rate is None else round(rate, 1),
             "cpu_share": None if window.cpu_share is None else round(window.cpu_share, 4)},
        ))
        return findings
    sizing = recommended_backlog(listener, window, policy, wait_ms)
    if sizing is None:
        rate = window.peak_accept_rate or 0.0
        findings.append(Finding(
            FindingId.WORKERS_SATURATED,
            f"{listener.address}: bursts overflow the queue, but {owner} drains at most {rate:.0f} connections/s, "
            f"fewer than its backlog of {listener.backlog} within max_queue_wait_ms "
            f"({policy.saturation.max_queue_wait_ms:g} ms): a longer queue would only hold connections longer; "
            f"add capacity ({workers})",
            {"accept_rate": round(rate, 1), "backlog": listener.backlog},
        ))
        return findings
    target = sizing.number
    if somaxconn is not None and listener.backlog == somaxconn and (requested is None or requested > somaxconn):
        if follows_somaxconn(requested, policy):
            # listen(INT_MAX) (systemd's Backlog= default, php-fpm's) means "as much as allowed".
            wanted = max(target, policy.somaxconn.min)
            asked = (f"it asks listen() for {requested}, i.e. as much as somaxconn allows, so it needs no "
                     "change of its own")
            app = ""
        else:
            # The first raise reaches what the listener asked for, if the bursts call for more.
            wanted = min(max(target, requested or 0, policy.somaxconn.min), policy.somaxconn.max)
            asked = (f"the application asked for {requested}" if requested is not None
                     else "the backlog the application asked for is unknown without eBPF" if events is None
                     else "it called listen() before aqtune started watching, so what it asked for is unknown")
            app = f"; {owner} must ask for that much too ({app_knob(listener.processes, wanted)})"
        findings.append(Finding(
            FindingId.CAPPED_BY_SOMAXCONN,
            f"{listener.address}: backlog {listener.backlog} is net.core.somaxconn's limit in netns "
            f"{listener.netns} ({asked}): raise somaxconn there to {wanted} ({sizing.basis}){app}; then "
            f"{owner} must call listen() again: " + _relisten_action(listener.processes),
            {"backlog": listener.backlog, "somaxconn": somaxconn, "requested": requested, "target": wanted,
             "basis": sizing.basis},
        ))
    else:
        extra = ""
        if somaxconn is not None and target > somaxconn:
            extra = f" (and raise net.core.somaxconn in netns {listener.netns} to at least {target})"
        if somaxconn is None or listener.backlog < somaxconn:
            limit = f"is below somaxconn ({somaxconn})"
        elif listener.backlog > somaxconn:
            # Granted under a higher somaxconn (before a rollback, say): it would shrink on a re-listen.
            limit = (f"was granted when somaxconn was higher (it is {somaxconn} now, so a new listen() would "
                     f"get only {somaxconn})")
        else:
            limit = f"is what it asked for (somaxconn is {somaxconn})"
        findings.append(Finding(
            FindingId.CAPPED_BY_APP,
            f"{listener.address}: backlog {listener.backlog} {limit}, so the limit is "
            f"{owner}'s own: " + app_knob(listener.processes, target) + f" ({sizing.basis})" + extra
            + "; then " + _relisten_action(listener.processes),
            {"backlog": listener.backlog, "somaxconn": somaxconn, "requested": requested, "target": target,
             "basis": sizing.basis},
        ))
    return findings


def follows_somaxconn(requested: int | None, policy: Policy) -> bool:
    """A listen() backlog at or above the policy's max (or 65535) asks for whatever somaxconn allows."""
    return requested is not None and requested >= min(policy.somaxconn.max, 65535)


def diagnose_namespace(netns: str, sysctls: dict[str, int], deltas: dict[str, int]) -> list[Finding]:
    """SYN-queue findings from a namespace's counter increases over the window.

    The SYN queue of a listener is capped by its own backlog; tcp_max_syn_backlog only adds a drop
    rule (the last quarter of it) when syncookies are off, so raising it is advised only then.
    """
    findings = []
    cookies = sysctls.get("net.ipv4.tcp_syncookies")
    syn_backlog = sysctls.get("net.ipv4.tcp_max_syn_backlog")
    full_drops = deltas.get("TCPReqQFullDrop", 0)
    cookie_sends = max(deltas.get("TCPReqQFullDoCookies", 0), deltas.get("SyncookiesSent", 0))
    other_drops = deltas.get("ListenDrops", 0) - deltas.get("ListenOverflows", 0) - full_drops
    evidence: dict[str, int | float | str | None] = {
        "tcp_syncookies": cookies, "tcp_max_syn_backlog": syn_backlog, **deltas}
    if full_drops and cookies == 0:
        findings.append(Finding(
            FindingId.SYN_QUEUE_FULL,
            f"netns {netns}: {full_drops} SYNs dropped because a listener's SYN queue (capped by its backlog) was "
            "full and syncookies are off: set net.ipv4.tcp_syncookies=1, and raise the listener's backlog",
            evidence,
        ))
    if other_drops > 0 and cookies == 0:
        findings.append(Finding(
            FindingId.SYN_BACKLOG_LIMIT,
            f"netns {netns}: {other_drops} SYNs dropped by net.ipv4.tcp_max_syn_backlog ({syn_backlog}) with "
            "syncookies off: raise tcp_max_syn_backlog",
            evidence,
        ))
    if cookie_sends and cookies:
        findings.append(Finding(
            FindingId.SYNCOOKIES_ACTIVE,
            f"netns {netns}: SYN queue overflowed and syncookies answered {cookie_sends} SYNs; "
            "tcp_max_syn_backlog does not limit anything while syncookies are on",
            evidence,
        ))
    return findings

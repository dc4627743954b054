"""What is wrong with a listener or a namespace, and what fixes it: pure functions of the model.

Each finding has a stable ``id`` scripts can key on, one line of ``text`` for a person, and the
figures it was based on. The effective backlog is min(listen() backlog, somaxconn at that call), and
a raised somaxconn reaches a listener only when it calls listen() again, so advice names the owning
process, its unit and its own knob.
"""

from __future__ import annotations

from dataclasses import dataclass

from aqtune.decide import servers
from aqtune.decide.findings import Finding, FindingId
from aqtune.decide.policy import Policy
from aqtune.model.history import ListenerWindow
from aqtune.records import Listener, Process

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


def suggested_backlog(listener: Listener, policy: Policy) -> int:
    grown = int(listener.backlog * policy.somaxconn.step)
    return min(max(grown, policy.somaxconn.min, listener.backlog + 1), policy.somaxconn.max)


def diagnose_listener(listener: Listener, window: ListenerWindow, somaxconn: int | None,
                      requested: int | None, raised: Raised | None, policy: Policy) -> list[Finding]:
    """Findings for one listener, most actionable first.

    Only a saturated listener gets advice about its backlog; one still waiting to call listen()
    again after aqtune raised somaxconn is told so even when idle, until it does.
    """
    owner = owner_label(listener.processes)
    findings: list[Finding] = []
    # Where eBPF saw the listen() call, a listener that asked for no more than it has is not waiting
    # for a re-listen.
    relisten = (raised is not None and listener.backlog < raised.applied
                and listener.backlog in (raised.original, *raised.earlier)
                and (requested is None or requested > listener.backlog))
    if window.saturated:
        drops = f", {window.drops} drops in the window" if window.drops else ""
        if window.span == 0:
            when = "now" + (f", {listener.drops} drops since it started listening" if listener.drops else "")
        else:
            when = f"for {window.high_for:.0f} s{drops}"
        findings.append(Finding(
            FindingId.SATURATED,
            f"{listener.address}: accept queue saturated, {listener.queue}/{listener.backlog} "
            f"(fill {window.fill:.2f}, peak {window.peak_fill:.2f}) {when}",
            {"queue": listener.queue, "backlog": listener.backlog, "fill": round(window.fill, 4),
             "peak_fill": round(window.peak_fill, 4), "high_for": round(window.high_for, 1),
             "drops": window.drops},
        ))
        # Said before any advice to lengthen the queue: that would only add latency.
        if window.cpu_share is not None and window.cpu_share < STALLED_CPU_SHARE:
            findings.append(Finding(
                FindingId.STALLED_WORKERS,
                f"{listener.address}: the queue is full while {owner} uses {window.cpu_share * 100:.1f}% of a "
                "CPU: its workers are blocked (on an upstream, a lock or I/O) or too few; a longer queue adds "
                "latency, not throughput: fix the workers first",
                {"cpu_share": round(window.cpu_share, 4)},
            ))
    if relisten and raised is not None:
        findings.append(Finding(
            FindingId.RELISTEN_NEEDED,
            f"{listener.address}: somaxconn was raised from {raised.original} to {raised.applied} but this "
            f"listener still has backlog {listener.backlog}; {owner} must call listen() again: "
            + _relisten_action(listener.processes),
            {"backlog": listener.backlog, "somaxconn": somaxconn, "raised_from": raised.original},
        ))
    if relisten or not window.saturated:
        return findings
    target = suggested_backlog(listener, policy)
    if somaxconn is not None and listener.backlog == somaxconn and (requested is None or requested > somaxconn):
        if follows_somaxconn(requested, policy):
            # listen(INT_MAX) (systemd's Backlog= default, php-fpm's) means "as much as allowed".
            wanted = target
            asked = (f"it asks listen() for {requested}, i.e. as much as somaxconn allows, so it needs no "
                     "change of its own")
            app = ""
        else:
            wanted = max(target, requested or 0)
            asked = (f"the application asked for {requested}" if requested is not None
                     else "the backlog the application asked for is unknown without eBPF")
            app = f"; {owner} must ask for that much too ({app_knob(listener.processes, wanted)})"
        findings.append(Finding(
            FindingId.CAPPED_BY_SOMAXCONN,
            f"{listener.address}: backlog {listener.backlog} is net.core.somaxconn's limit in netns "
            f"{listener.netns} ({asked}): raise somaxconn there to {wanted}{app}; then {owner} must call "
            "listen() again: " + _relisten_action(listener.processes),
            {"backlog": listener.backlog, "somaxconn": somaxconn, "requested": requested, "target": wanted},
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
            f"{owner}'s own: " + app_knob(listener.processes, target) + extra,
            {"backlog": listener.backlog, "somaxconn": somaxconn, "requested": requested, "target": target},
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

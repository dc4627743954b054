"""`aqtune status`: a snapshot as a JSON document or as tables a person reads at a glance."""

from __future__ import annotations

import time
from typing import Any

from aqtune.act.ledger import Ledger
from aqtune.decide.assess import Assessment, assess
from aqtune.decide.diagnose import Finding
from aqtune.decide.policy import Policy
from aqtune.model.history import Model
from aqtune.records import Listener, Namespace, Snapshot

SHORT_SYSCTL = {
    "net.core.somaxconn": "somaxconn",
    "net.ipv4.tcp_max_syn_backlog": "tcp_max_syn_backlog",
    "net.ipv4.tcp_syncookies": "tcp_syncookies",
    "net.ipv4.tcp_abort_on_overflow": "tcp_abort_on_overflow",
}


def one_shot_advice(snapshot: Snapshot, policy: Policy, ledger: Ledger) -> Assessment:
    """The advice one snapshot supports: fill now rather than sustained, no drop or counter rates."""
    model = Model()
    model.update(snapshot, {})
    managed = {ns.name: ledger.managed(ns.inode) for ns in snapshot.namespaces}
    return assess(snapshot, model, policy, managed, one_shot=True)


def _advice_json(findings: list[Finding]) -> list[dict[str, Any]]:
    return [{"id": f.id, "text": f.text, "evidence": f.evidence} for f in findings]


def worst_first(listeners: list[Listener]) -> list[Listener]:
    return sorted(listeners, key=lambda l: (-l.fill, -(l.drops or 0), l.netns, l.address))


def listener_json(listener: Listener, findings: list[Finding]) -> dict[str, Any]:
    return {
        "netns": listener.netns,
        "proto": listener.proto,
        "address": listener.address,
        "port": listener.port,
        "queue": listener.queue,
        "backlog": listener.backlog,
        "fill": round(listener.fill, 4),
        "drops": listener.drops,
        "cookie": listener.cookie,
        "inode": listener.inode,
        "uid": listener.uid,
        "processes": [
            {"pid": p.pid, "comm": p.comm, "cmdline": p.cmdline, "unit": p.unit} for p in listener.processes
        ],
        "events": None,
        "advice": _advice_json(findings),
    }


def namespace_json(namespace: Namespace, findings: list[Finding]) -> dict[str, Any]:
    return {
        "name": namespace.name,
        "inode": namespace.inode,
        "sysctls": namespace.sysctls,
        "counters": namespace.counters,
        "listeners": namespace.listeners,
        "skipped_messages": namespace.skipped_messages,
        "error": namespace.error,
        "advice": _advice_json(findings),
    }


def snapshot_json(snapshot: Snapshot, advice: Assessment) -> dict[str, Any]:
    return {
        "source": "sweep",
        "taken_at": snapshot.taken_at,
        "duration_ms": round(snapshot.duration * 1000, 3),
        "listeners": [listener_json(listener, advice.listener_findings.get((listener.netns, listener.cookie), []))
                      for listener in worst_first(snapshot.listeners)],
        "namespaces": [namespace_json(namespace, advice.namespace_findings.get(namespace.name, []))
                       for namespace in snapshot.namespaces],
        "ebpf": {"active": False, "probes": {},
                 "mode": "one-shot status has no event history: `aqtune trace` shows events live"},
    }


def owner_text(listener: Listener) -> str:
    if not listener.processes:
        return "-"
    first = listener.processes[0]
    text = f"{first.pid}/{first.comm}"
    if len(listener.processes) > 1:
        text += f" +{len(listener.processes) - 1}"
    units = sorted({p.unit for p in listener.processes if p.unit})
    if units:
        text += f" ({', '.join(units)})"
    return text


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return lines


def render(snapshot: Snapshot, advice: Assessment, previous_drops: dict[int, int] | None = None) -> str:
    """Listeners worst first, then each namespace's sysctls and counters.

    With ``previous_drops`` (cookie -> drops at the last refresh) the drops column also shows the
    increase since then, which is what a person watching wants to see move.
    """
    when = time.strftime("%H:%M:%S", time.localtime(snapshot.taken_at))
    lines = [
        f"aqtune status: one-shot sweep at {when} in {snapshot.duration * 1000:.1f} ms, "
        f"{len(snapshot.listeners)} listeners in {len(snapshot.namespaces)} network namespaces",
        "",
    ]
    rows = [["NETNS", "PROTO", "LISTENER", "QUEUE/BACKLOG", "FILL", "DROPS", "OWNER"]]
    for listener in worst_first(snapshot.listeners):
        drops = "-" if listener.drops is None else str(listener.drops)
        if previous_drops is not None and listener.drops is not None:
            drops += f" (+{listener.drops - previous_drops.get(listener.cookie, listener.drops)})"
        rows.append([
            listener.netns, listener.proto, listener.address, f"{listener.queue}/{listener.backlog}",
            f"{listener.fill:.2f}", drops, owner_text(listener),
        ])
    lines += _table(rows, right={3, 4, 5})
    lines.append("")
    findings = [f for listener in worst_first(snapshot.listeners)
                for f in advice.listener_findings.get((listener.netns, listener.cookie), [])]
    findings += [f for group in advice.namespace_findings.values() for f in group]
    if findings:
        lines.append("ADVICE")
        lines += [f"  [{f.id}] {f.text}" for f in findings]
        lines.append("")
    for namespace in snapshot.namespaces:
        lines.append(f"netns {namespace.name} (net:[{namespace.inode}]), {namespace.listeners} listeners")
        if namespace.error:
            lines.append(f"  ! {namespace.error}")
        if namespace.skipped_messages:
            lines.append(f"  ! {namespace.skipped_messages} malformed netlink messages skipped")
        if namespace.sysctls:
            lines.append("  " + "  ".join(f"{SHORT_SYSCTL[k]}={v}" for k, v in namespace.sysctls.items()))
        if namespace.counters:
            lines.append("  " + "  ".join(f"{k}={v}" for k, v in namespace.counters.items()))
    return "\n".join(lines)

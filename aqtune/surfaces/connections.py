"""`aqtune connections`: a listener's long-running and idle connections, the workers holding them, and
whether they are why its queue does not drain.

As `status`, the document (``--json``) is built first and the table rendered from it. Everything a
local user chose (socket paths, process names, namespace names) is C-escaped in the table, and the
output is bounded: the worst connections of the worst listeners, with a count of the rest.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aqtune.collect.connections import (
    AGES_EBPF,
    ListenerKey,
    is_idle,
    is_long_held,
)
from aqtune.decide import servers
from aqtune.decide.connections import held_by_connections, reuseport_stalled
from aqtune.decide.findings import Finding
from aqtune.decide.policy import Policy
from aqtune.model.groups import group_json, reuseport_groups
from aqtune.records import Connection, ConnectionSummary, Listener
from aqtune.surfaces.status import owner_text
from aqtune.text import cescape

TOP_LISTENERS = 20  # listeners shown without --all


@dataclass(frozen=True, slots=True)
class Shown:
    """One listener as the command shows it."""

    listener: Listener
    summary: ConnectionSummary
    findings: list[Finding]


def diagnose(listeners: Sequence[Listener], summaries: Mapping[ListenerKey, ConnectionSummary],
             policy: Policy) -> dict[ListenerKey, list[Finding]]:
    """The findings the connections support for listeners full now (a one-shot look has one sample)."""
    groups = reuseport_groups(listeners)
    found: dict[ListenerKey, list[Finding]] = {}
    for listener in listeners:
        key = (listener.netns, listener.cookie)
        if listener.fill < policy.saturation.fill_ratio:
            continue
        findings = []
        group = groups.get((listener.netns, listener.proto, listener.address))
        if group is not None:
            stalled = reuseport_stalled(listener, group, policy)
            if stalled is not None:
                findings.append(stalled)
        summary = summaries.get(key)
        if summary is not None:
            held = held_by_connections(listener, summary, servers.identify(listener.processes), policy)
            if held is not None:
                findings.append(held)
        if findings:
            found[key] = findings
    return found


def order(shown: Iterable[Shown]) -> list[Shown]:
    """Worst first: most long-held or idle connections, then most connections, then fullest queue."""
    return sorted(shown, key=lambda s: (-s.summary.held, -(s.summary.accepted + s.summary.queued), -s.listener.fill,
                                        s.listener.netns, s.listener.address, s.listener.cookie))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def connection_json(connection: Connection, now: float, long_after: float, idle_after: float) -> dict[str, Any]:
    age = connection.age(now)
    return {
        "peer": connection.peer, "state": "queued" if connection.queued else connection.state,
        "inode": connection.inode, "cookie": connection.cookie,
        "accepted_at": connection.accepted_at, "age_s": _round(age),
        # Without an eBPF age, what tcp_info proves: the connection is at least this old.
        "age_at_least_s": _round(connection.min_age) if age is None else None,
        "idle_s": _round(connection.recv_idle), "sent_idle_s": _round(connection.send_idle),
        "bytes_in": connection.bytes_in, "bytes_out": connection.bytes_out,
        "rqueue": connection.rqueue, "wqueue": connection.wqueue,
        "long_held": is_long_held(connection, now, long_after), "idle": is_idle(connection, idle_after),
        "holders": [{"pid": p.pid, "comm": p.comm, "unit": p.unit} for p in connection.holders],
    }


def summary_json(summary: ConnectionSummary) -> dict[str, Any]:
    """A listener's connection counts, as `connections --json` shows them (and the daemon's state may)."""
    return {
        "accepted": summary.accepted, "queued": summary.queued, "long_held": summary.long_held,
        "idle": summary.idle, "held": summary.held, "answered": summary.answered,
        "oldest_s": _round(summary.oldest), "oldest_queued_s": _round(summary.oldest_queued),
        "held_by": list(summary.held_by), "busy": list(summary.busy), "shared": summary.shared,
        "unread": summary.unread, "ages": summary.ages,
    }


def _held(connection: Connection, summary: ConnectionSummary) -> bool:
    return not connection.queued and (is_long_held(connection, summary.taken_at, summary.long_after)
                                      or is_idle(connection, summary.idle_after))


def listener_json(shown: Shown, groups: Mapping[tuple[str, str, str], list[Listener]],
                  every: bool) -> dict[str, Any]:
    listener, summary = shown.listener, shown.summary
    rows = list(summary.top) if every else [c for c in summary.top if _held(c, summary)]
    more = summary.more if every else summary.held - len(rows)
    return {
        "netns": listener.netns, "proto": listener.proto, "address": listener.address, "port": listener.port,
        "cookie": listener.cookie, "inode": listener.inode, "queue": listener.queue, "backlog": listener.backlog,
        "fill": round(listener.fill, 4), "group": group_json(listener, dict(groups)),
        "processes": [{"pid": p.pid, "comm": p.comm, "cmdline": p.cmdline, "unit": p.unit}
                      for p in listener.processes],
        "summary": summary_json(summary),
        "connections": [connection_json(c, summary.taken_at, summary.long_after, summary.idle_after) for c in rows],
        "more": max(more, 0),
        "advice": [{"id": f.id, "text": f.text, "evidence": f.evidence} for f in shown.findings],
    }


def document(listeners: Sequence[Listener], summaries: Mapping[ListenerKey, ConnectionSummary], policy: Policy,
             ages: str, ages_note: str, errors: Mapping[str, str], every: bool, taken_at: float,
             selected: bool) -> dict[str, Any]:
    """The `aqtune connections --json` document. ``selected``: the listeners were asked for by port or
    address (shown even without connections); otherwise only those with connections are, the worst
    TOP_LISTENERS of them unless ``every``."""
    findings = diagnose(listeners, summaries, policy)
    shown = [Shown(l, summaries[(l.netns, l.cookie)], findings.get((l.netns, l.cookie), []))
             for l in listeners if (l.netns, l.cookie) in summaries]
    if not selected:
        shown = [s for s in shown if s.summary.accepted or s.summary.queued]
    ordered = order(shown)
    kept = ordered if every or selected else ordered[:TOP_LISTENERS]
    groups = reuseport_groups(listeners)
    return {
        "taken_at": taken_at, "ages": ages, "ages_note": ages_note,
        "long_after": policy.connections.long_after, "idle_after": policy.connections.idle_after,
        "listeners": [listener_json(s, groups, every) for s in kept],
        "more_listeners": len(ordered) - len(kept),
        "errors": dict(errors),
    }


# --- the table -----------------------------------------------------------------------------------------


def _seconds(value: float | None, at_least: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{value:.1f}s" if value < 100 else f"{value:.0f}s"
    return (">=" + text) if at_least else text


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                             for i, cell in enumerate(row)).rstrip() for row in rows]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _listener_lines(entry: dict[str, Any], every: bool) -> list[str]:
    s = entry["summary"]
    where = f"{cescape(entry['address'])} ({entry['proto']}, netns {cescape(entry['netns'])})"
    owner = owner_text([{**p, "comm": cescape(p["comm"]), "unit": p["unit"] and cescape(p["unit"])}
                        for p in entry["processes"]])
    group = f", one of {entry['group']['members']} SO_REUSEPORT sockets (their connections together)" \
        if entry["group"] else ""
    queued = f", {s['queued']} queued" + (f" (oldest {_seconds(s['oldest_queued_s'])})"
                                          if s["oldest_queued_s"] is not None else "") if s["queued"] else ""
    lines = [f"{where} owner {owner}: queue {entry['queue']}/{entry['backlog']}{group}",
             f"  {_plural(s['accepted'], 'connection')} accepted: {s['long_held']} long-held, {s['idle']} idle"
             f"{queued}" + (f", oldest open {_seconds(s['oldest_s'])}" if s["oldest_s"] is not None else "")]
    rows = [["PEER", "STATE", "AGE", "IDLE", "IN", "OUT", "PID", "WORKER"]]
    for c in entry["connections"]:
        holders = c["holders"]
        rows.append([
            cescape(c["peer"]), c["state"],
            _seconds(c["age_s"]) if c["age_s"] is not None else _seconds(c["age_at_least_s"], at_least=True),
            _seconds(c["idle_s"]), _bytes(c["bytes_in"]), _bytes(c["bytes_out"]),
            str(holders[0]["pid"]) if holders else "-",
            (cescape(holders[0]["comm"]) + (f" +{len(holders) - 1}" if len(holders) > 1 else "")) if holders else "-",
        ])
    if len(rows) > 1:
        lines += _table(rows, right={2, 3, 4, 5, 6})
    elif s["accepted"] and not every:
        lines.append("  none long-held or idle (--all lists every connection)")
    if entry["more"]:
        lines.append(f"  and {entry['more']} more" + ("" if every else " (--all lists every one)"))
    if s["unread"]:
        lines.append(f"  ! {s['unread']} connections in this namespace were not read (at most 100000 are)")
    lines += [f"  [{a['id']}] {cescape(a['text'])}" for a in entry["advice"]]
    return lines


def render(doc: dict[str, Any], every: bool = False) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(doc["taken_at"]))
    shown = doc["listeners"]
    lines = [
        f"aqtune connections at {when}: {_plural(len(shown), 'listener')}; long-held: open over "
        f"{doc['long_after']:g} s, idle: nothing received for {doc['idle_after']:g} s",
        f"ages: {doc['ages_note']}",
    ]
    for entry in shown:
        lines += ["", *_listener_lines(entry, every)]
    if not shown:
        lines += ["", "no connections to show"]
    if doc["more_listeners"]:
        lines += ["", f"and {_plural(doc['more_listeners'], 'more listener')} with connections (--all shows them)"]
    for netns_name, why in doc["errors"].items():
        lines.append(f"! netns {cescape(netns_name)}: {cescape(why)}")
    return "\n".join(lines)


def ages_note(ages: str, why_not: str | None) -> str:
    if ages == AGES_EBPF:
        return ("from the daemon's eBPF accept times (>= marks a lower bound from tcp_info, for connections "
                "accepted before it started)")
    return f"no eBPF accept times ({why_not}): ages are lower bounds from tcp_info (>=); idle times are exact"

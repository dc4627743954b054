"""The status document (`aqtune status --json`, the daemon's state file) and its rendering as tables.

Everything a person or a script sees is built as one JSON-able document first, from a one-shot
sweep or by the daemon; the table is rendered from that document, so both look the same.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import replace
from json.encoder import encode_basestring_ascii as json_string
from typing import TYPE_CHECKING, Any

from aqtune.decide.findings import Assessment, Finding
from aqtune.decide.policy import Policy, may_be_judged
from aqtune.model.groups import group_json, reuseport_groups
from aqtune.records import Listener, ListenerEvents, Namespace, Process, Snapshot
from aqtune.text import cescape, ljust, rjust, width

if TYPE_CHECKING:
    from aqtune.act.ledger import Ledger

SHORT_SYSCTL = {
    "net.core.somaxconn": "somaxconn",
    "net.ipv4.tcp_max_syn_backlog": "tcp_max_syn_backlog",
    "net.ipv4.tcp_syncookies": "tcp_syncookies",
    "net.ipv4.tcp_abort_on_overflow": "tcp_abort_on_overflow",
}
ONE_SHOT_EBPF = {"active": False, "probes": {},
                 "mode": "one-shot status has no event history: `aqtune trace` shows events live"}


def one_shot_advice(snapshot: Snapshot, policy: Policy, ledger: Ledger) -> Assessment:
    """The advice one snapshot supports: the daemon's decision on a single sample.

    With no listener one sample can judge (policy.may_be_judged), there is no advice at all: the
    decision code is then not even imported, a fifth of the start-up of `aqtune status` in a loop on
    a quiet host."""
    managed = {ns.inode: ledger.managed(ns.inode) for ns in snapshot.namespaces}
    if not may_be_judged(snapshot, policy, managed):
        return Assessment()
    from aqtune.decide import tick

    return tick.one_shot(snapshot, policy, managed).assessment


def _advice_json(findings: list[Finding]) -> list[dict[str, Any]]:
    return [{"id": f.id, "text": f.text, "evidence": f.evidence} for f in findings]


def worst_first(listeners: list[Listener]) -> list[Listener]:
    return sorted(listeners, key=lambda l: (-l.fill, -(l.drops or 0), l.netns, l.address))


def processes_json(processes: tuple[Process, ...]) -> list[dict[str, Any]]:
    return [{"pid": p.pid, "comm": p.comm, "cmdline": p.cmdline, "unit": p.unit} for p in processes]


def listener_json(listener: Listener, findings: list[Finding], events: ListenerEvents | None = None,
                  group: dict[str, Any] | None = None,
                  processes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One listener of the status document; ``processes``: its owners' entries, made already (and
    shared by the listeners of one server, for a document that is only read)."""
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
        "group": group,  # its SO_REUSEPORT group ({address, members}), or None
        "processes": processes_json(listener.processes) if processes is None else processes,
        "events": _events_json(events) if events is not None else None,
        "advice": _advice_json(findings) if findings else [],
    }


def _events_json(events: ListenerEvents) -> dict[str, Any]:
    # By hand, not dataclasses.asdict: that deep-copies, and the daemon does this per listener per sweep.
    return {"enqueued": events.enqueued, "peak_queue": events.peak_queue, "ack_overflow": events.ack_overflow,
            "syn_overflow": events.syn_overflow, "synack_retransmits": events.synack_retransmits,
            "accepts": events.accepts, "queue_wait_ms": events.queue_wait_ms,
            "requested_backlog": events.requested_backlog, "oldest_queued_ms": events.oldest_queued_ms}


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


def snapshot_json(snapshot: Snapshot, advice: Assessment, events: Mapping[int, ListenerEvents] | None = None,
                  ebpf: dict[str, Any] | None = None, source: str = "sweep") -> dict[str, Any]:
    """The status document; ``events`` maps socket inodes to what eBPF saw, where it runs."""
    seen = events or {}
    groups = reuseport_groups(snapshot.listeners)
    findings = advice.listener_findings
    # Keyed by the identity of the owners' tuple: find_owners gives all sockets of one set of holders
    # one tuple, so the 10,000 listeners of one server share one list instead of making 10,000.
    owners: dict[int, list[dict[str, Any]]] = {}
    for listener in snapshot.listeners:
        if id(listener.processes) not in owners:
            owners[id(listener.processes)] = processes_json(listener.processes)
    return {
        "source": source,
        "taken_at": snapshot.taken_at,
        "duration_ms": round(snapshot.duration * 1000, 3),
        "listeners": [listener_json(listener, findings.get((listener.netns, listener.cookie), []),
                                    seen.get(listener.inode), group_json(listener, groups),
                                    owners[id(listener.processes)])
                      for listener in worst_first(snapshot.listeners)],
        "namespaces": [namespace_json(namespace, advice.namespace_findings.get(namespace.name, []))
                       for namespace in snapshot.namespaces],
        "ebpf": ebpf if ebpf is not None else ONE_SHOT_EBPF,
    }


def compact(value: Any) -> str:
    """JSON as `ip -j` prints it: the C encoder, no spaces; check_circular off (documents are trees)."""
    return json.dumps(value, separators=(",", ":"), check_circular=False)


# A listener's entry with no finding, group or events, as compact JSON in one %-format: at 10,000
# listeners, making 10,000 entry dicts and the C encoder's pass over them was a third of a one-shot
# `status --json`, and this is three times as fast. The unit tests hold it, byte for byte, to
# compact(listener_json(...)).
_PLAIN_ENTRY = ('{"netns":%s,"proto":%s,"address":%s,"port":%s,"queue":%d,"backlog":%d,"fill":%r,"drops":%s,'
                '"cookie":%d,"inode":%d,"uid":%s,"group":null,"processes":%s,"events":null,"advice":[]}')


def _number(value: int | None) -> str:
    return "null" if value is None else str(int(value))


def snapshot_text(snapshot: Snapshot, advice: Assessment) -> str:
    """compact(snapshot_json(snapshot, advice)) for a one-shot sweep (no events), made faster: plain
    entries by _PLAIN_ENTRY, names escaped by the encoder's own string escaping, each namespace name
    and each set of owners encoded once."""
    groups = reuseport_groups(snapshot.listeners)
    findings = advice.listener_findings
    owners: dict[int, str] = {}
    strings: dict[str, str] = {}
    entries = []
    for listener in worst_first(snapshot.listeners):
        found, group = findings.get((listener.netns, listener.cookie)), group_json(listener, groups)
        if found or group is not None:
            entries.append(compact(listener_json(listener, found or [], None, group)))
            continue
        held = owners.get(id(listener.processes))
        if held is None:
            held = owners[id(listener.processes)] = compact(processes_json(listener.processes))
        netns, proto = strings.get(listener.netns), strings.get(listener.proto)
        if netns is None:
            netns = strings[listener.netns] = json_string(listener.netns)
        if proto is None:
            proto = strings[listener.proto] = json_string(listener.proto)
        entries.append(_PLAIN_ENTRY % (
            netns, proto, json_string(listener.address), _number(listener.port), listener.queue, listener.backlog,
            round(listener.fill, 4), _number(listener.drops), listener.cookie, listener.inode, _number(listener.uid),
            held))
    head = snapshot_json(replace(snapshot, listeners=[]), advice)
    listed = "[" + ",".join(entries) + "]"
    return "{" + ",".join(f"{compact(key)}:{listed if key == 'listeners' else compact(value)}"
                          for key, value in head.items()) + "}"


class OneShot:
    """A one-shot sweep's status: made into the document (tables, indented JSON), or straight into
    compact JSON."""

    __slots__ = ("advice", "snapshot")

    def __init__(self, snapshot: Snapshot, advice: Assessment) -> None:
        self.snapshot, self.advice = snapshot, advice

    def document(self) -> dict[str, Any]:
        return snapshot_json(self.snapshot, self.advice)

    def text(self) -> str:
        return snapshot_text(self.snapshot, self.advice)


def only_namespace(document: dict[str, Any], name: str) -> dict[str, Any]:
    """The document limited to one namespace (the daemon's state holds all it watches)."""
    if name == "all":
        return document
    names = {ns["name"] for ns in document["namespaces"] if name in (ns["name"], str(ns["inode"]))}
    return {**document, "listeners": [l for l in document["listeners"] if l["netns"] in names],
            "namespaces": [ns for ns in document["namespaces"] if ns["name"] in names]}


def wait_text(events: dict[str, Any] | None) -> str:
    """How long connections wait in the queue: the oldest still queued, else the accepted p99; "-" where
    unknown (no eBPF, or a one-shot sweep)."""
    if not events:
        return "-"
    oldest = events.get("oldest_queued_ms")
    p99 = (events.get("queue_wait_ms") or {}).get("p99")
    wait = max([w for w in (oldest, p99) if w is not None], default=None)
    if wait is None:
        return "-"
    return f"{wait / 1000:.1f}s" if wait >= 1000 else f"{wait:.0f}ms"


def owner_text(processes: list[dict[str, Any]]) -> str:
    """``pid/comm +N (units)``, escaped: comm and unit names are chosen by whoever runs the process."""
    if not processes:
        return "-"
    first = processes[0]
    text = f"{first['pid']}/{cescape(first['comm'])}"
    if len(processes) > 1:
        text += f" +{len(processes) - 1}"
    units = sorted({p["unit"] for p in processes if p["unit"]})
    if units:
        text += f" ({', '.join(cescape(unit) for unit in units)})"
    return text


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    """Columns aligned by display width; the cells must be escaped already."""
    widths = [max(width(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [rjust(cell, widths[i]) if i in right else ljust(cell, widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return lines


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _left_out_lines(document: dict[str, Any]) -> list[str]:
    """What the daemon's budgets left out of its last sweep and of its state file (daemon state only)."""
    sweep, left_out = document.get("sweep"), document.get("left_out")
    lines = []
    if sweep and sweep["partial"]:
        lines.append(f"partial sweep: {_plural(sweep['skipped_namespaces'], 'namespace')} left for the next sweep")
    if sweep and sweep["skipped_listeners"]:
        lines.append(f"{_plural(sweep['skipped_listeners'], 'listener')} over the [limits] listeners budget, "
                     "watched in turn")
    if left_out and (left_out["listeners"] or left_out["namespaces"]):
        lines.append(f"not listed: {_plural(left_out['listeners'], 'listener')} (the worst are), "
                     f"{_plural(left_out['namespaces'], 'namespace')}")
    return lines


def render(document: dict[str, Any], previous_drops: dict[int, int] | None = None) -> str:
    """Listeners worst first, the advice, then each namespace's sysctls and counters.

    With ``previous_drops`` (cookie -> drops at the last refresh) the drops column also shows the
    increase since then, which is what a person watching wants to see move.

    Every string from the document is escaped (aqtune.text.cescape): addresses, namespace names,
    owners and advice carry names any local user chooses, and the result goes to a terminal.
    """
    when = time.strftime("%H:%M:%S", time.localtime(document["taken_at"]))
    source = ("the running daemon's state" if document["source"] == "daemon" else "one-shot sweep")
    listeners = document["listeners"]
    lines = [
        f"aqtune status: {source} at {when} in {document['duration_ms']:.1f} ms, "
        f"{_plural(len(listeners), 'listener')} in {_plural(len(document['namespaces']), 'network namespace')}",
        f"eBPF: {'on' if document['ebpf']['active'] else 'off'}: {cescape(document['ebpf']['mode'])}",
        *_left_out_lines(document),
        "",
    ]
    rows = [["NETNS", "PROTO", "LISTENER", "QUEUE/BACKLOG", "FILL", "DROPS", "WAIT", "OWNER"]]
    for listener in listeners:
        drops = "-" if listener["drops"] is None else str(listener["drops"])
        if previous_drops is not None and listener["drops"] is not None:
            drops += f" (+{listener['drops'] - previous_drops.get(listener['cookie'], listener['drops'])})"
        rows.append([
            cescape(listener["netns"]), cescape(listener["proto"]), cescape(listener["address"]),
            f"{listener['queue']}/{listener['backlog']}", f"{listener['fill']:.2f}", drops,
            wait_text(listener.get("events")), owner_text(listener["processes"]),
        ])
    lines += _table(rows, right={3, 4, 5, 6})
    lines.append("")
    advice = [a for listener in listeners for a in listener["advice"]]
    advice += [a for ns in document["namespaces"] for a in ns["advice"]]
    if advice:
        lines.append("ADVICE")
        lines += [f"  [{cescape(a['id'])}] {cescape(a['text'])}" for a in advice]
        lines.append("")
    for ns in document["namespaces"]:
        lines.append(f"netns {cescape(ns['name'])} (net:[{ns['inode']}]), {_plural(ns['listeners'], 'listener')}")
        if ns["error"]:
            lines.append(f"  ! {cescape(ns['error'])}")
        if ns["skipped_messages"]:
            lines.append(f"  ! {ns['skipped_messages']} malformed netlink messages skipped")
        if ns["sysctls"]:
            lines.append("  " + "  ".join(f"{SHORT_SYSCTL.get(k, k)}={v}" for k, v in ns["sysctls"].items()))
        if ns["counters"]:
            lines.append("  " + "  ".join(f"{cescape(k)}={v}" for k, v in ns["counters"].items()))
    return "\n".join(lines)

"""`aqtune status --watch`: one screen instead of six panes (ss, server-status, tcpconnlat, sar -n
ETCP, a count of established connections, tcpretrans).

Per listener, worst first: queue/backlog and fill, accepts/s, drops/s, SYN-ACK retransmits/s,
established and long-held connections (for listeners full now: their connections are read then and
only then), and how long connections wait (the oldest still queued, else the accept-wait p99). Under
each namespace's listeners its TcpExt counters as rates, as `sar -n ETCP` shows them. Advice is one
line per listener, cut to the screen's width (the full text is in `--json` and the journal).

Rates are differences between two documents over the time between them, so the first frame has
none. Colour marks fill and waits on a terminal that takes it; plain text otherwise. Everything a
local user named is escaped (aqtune.text) and every line fits the width: 80 columns at least.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

from aqtune.collect.connections import AcceptedAt
from aqtune.decide.findings import SPECS, FindingId, Role
from aqtune.decide.policy import Policy
from aqtune.records import ConnectionSummary, Listener, Process
from aqtune.text import cescape, clip, ljust, rjust

WIDTH = 80  # the narrowest screen a frame is made for
CONNECTION_LISTENERS = 5  # full listeners whose connections one frame reads
# (TcpExt counter, label): short, as sar -n ETCP's, so the line fits 80 columns at any value.
TCPEXT_RATES = (
    ("ListenOverflows", "ovfl"), ("ListenDrops", "ldrop"), ("TCPReqQFullDrop", "reqq"),
    ("SyncookiesSent", "cookie"), ("TCPSynRetrans", "synrtx"),
)
# LISTENER is what is left of the width after the fixed columns.
COLUMNS = (("QUEUE/BL", 11), ("FILL", 5), ("ACC/s", 6), ("DROP/s", 6), ("RTX/s", 6), ("EST", 5), ("LONG", 5),
           ("WAIT", 6))
RED, YELLOW, RESET = "\x1b[31m", "\x1b[33m", "\x1b[0m"


@dataclass(frozen=True, slots=True)
class Frame:
    """What one frame saw, for the next frame's rates."""

    taken_at: float
    listeners: dict[int, tuple[int | None, int | None, int | None]]  # cookie -> (drops, accepts, SYN-ACK rtx)
    counters: dict[str, dict[str, int]]  # netns -> TcpExt counters


def frame_of(document: dict[str, Any]) -> Frame:
    listeners = {}
    for l in document["listeners"]:
        events = l.get("events") or {}
        listeners[l["cookie"]] = (l["drops"], events.get("accepts"), events.get("synack_retransmits"))
    return Frame(document["taken_at"], listeners, {ns["name"]: dict(ns["counters"]) for ns in document["namespaces"]})


def _rate(now: int | None, before: int | None, seconds: float) -> float | None:
    if now is None or before is None or seconds <= 0:
        return None
    return max(now - before, 0) / seconds


def _number(value: float | None) -> str:
    """At most 5 characters: 7, 4.5, 250, 12.3k, 450k, 1.2M ..."""
    if value is None:
        return "-"
    for unit, scale in (("", 1.0), ("k", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12)):
        scaled = value / scale
        if scaled < 999.5:
            if not unit and scaled == int(scaled):
                return f"{scaled:.0f}"
            return f"{scaled:.1f}{unit}" if scaled < 99.95 else f"{scaled:.0f}{unit}"
    return "huge"


def _duration_ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1000:
        return f"{value:.0f}ms"
    if value < 100_000:
        return f"{value / 1000:.1f}s"
    return f"{value / 1000:.0f}s"


def wait_ms(listener: Mapping[str, Any], summary: ConnectionSummary | None) -> float | None:
    """How long connections wait: the oldest still queued (eBPF, else tcp_info for a full listener whose
    connections were read), else the accept-wait p99 (eBPF)."""
    events = listener.get("events") or {}
    oldest = events.get("oldest_queued_ms")
    if oldest:
        return float(oldest)
    if summary is not None and summary.oldest_queued is not None:
        return summary.oldest_queued * 1000
    p99 = (events.get("queue_wait_ms") or {}).get("p99")
    return None if p99 is None else float(p99)


def _paint(text: str, colour: str | None, enabled: bool) -> str:
    return f"{colour}{text}{RESET}" if enabled and colour else text


def _fill_colour(fill: float, policy: Policy) -> str | None:
    if fill >= 1.0:
        return RED
    return YELLOW if fill >= policy.saturation.fill_ratio else None


def _wait_colour(wait: float | None, policy: Policy) -> str | None:
    if wait is None:
        return None
    limit = policy.saturation.max_queue_wait_ms
    if wait > limit:
        return RED
    return YELLOW if wait > limit / 4 else None


def _role(finding_id: str) -> Role | None:
    try:
        return SPECS[FindingId(finding_id)].role
    except ValueError:  # an id this version does not know (a newer daemon's state)
        return None


def advice_line(listener: Mapping[str, Any]) -> str | None:
    """The listener's first problem (else its first finding but the bare "saturated" state), escaped,
    unclipped; None when it has none."""
    advice = listener.get("advice") or []
    problems = [a for a in advice if _role(a["id"]) is Role.PROBLEM]
    others = [a for a in advice if _role(a["id"]) is not Role.STATE]
    chosen = (problems or others or [None])[0]
    if chosen is None:
        return None
    return f"[{cescape(chosen['id'])}] {cescape(chosen['text'])}"


def render(document: dict[str, Any], previous: Frame | None, summaries: Mapping[int, ConnectionSummary],
           policy: Policy, colour: bool = False, rows: int = 24, columns: int = WIDTH,
           interval: float = 2.0) -> str:
    """One screen. ``summaries`` maps listener cookies to their connections (connection_summaries());
    ``rows`` bounds the listeners shown, the rest are counted."""
    columns = max(columns, WIDTH)
    seconds = document["taken_at"] - previous.taken_at if previous is not None else 0.0
    fixed = sum(width + 1 for _, width in COLUMNS)
    name_width = columns - fixed - 1
    when = time.strftime("%H:%M:%S", time.localtime(document["taken_at"]))
    source = "the daemon's state" if document["source"] == "daemon" else "a one-shot sweep"
    ebpf = "eBPF on" if document["ebpf"]["active"] else "eBPF off"
    rate_note = f"rates over {seconds:.1f} s" if seconds > 0 else "rates from the next frame on"
    lines = [clip(f"aqtune {when}: {source}, {ebpf}; {rate_note} (every {interval:g} s)", columns),
             ljust("LISTENER", name_width) + " " + " ".join(rjust(h, w) for h, w in COLUMNS)]
    listeners = document["listeners"]
    budget = max(rows - 4, 1)  # the two header lines, a namespace line, the count of the rest
    shown: dict[str, list[dict[str, Any]]] = {}
    used = 0
    for listener in listeners:
        cost = 1 + (1 if advice_line(listener) else 0) + (0 if listener["netns"] in shown else 2)
        if used + cost > budget:
            break
        shown.setdefault(listener["netns"], []).append(listener)
        used += cost
    counters = {ns["name"]: ns["counters"] for ns in document["namespaces"]}
    for netns_name, members in shown.items():
        lines.append(clip(f"netns {cescape(netns_name)}", columns))
        for listener in members:
            lines += _listener_lines(listener, previous, seconds, summaries.get(listener["cookie"]), policy, colour,
                                     name_width, columns)
        lines.append(_tcpext_line(counters.get(netns_name, {}), previous.counters.get(netns_name)
                                  if previous else None, seconds, columns))
    left = len(listeners) - sum(len(m) for m in shown.values())
    if left:
        lines.append(f"and {left} more listener{'' if left == 1 else 's'} (aqtune status lists every one)")
    return "\n".join(lines)


def _listener_lines(listener: dict[str, Any], previous: Frame | None, seconds: float,
                    summary: ConnectionSummary | None, policy: Policy, colour: bool, name_width: int,
                    columns: int) -> list[str]:
    events = listener.get("events") or {}
    before = previous.listeners.get(listener["cookie"]) if previous is not None else None
    drops = accepts = rtx = None
    if before is not None:
        drops = _rate(listener["drops"], before[0], seconds)
        accepts = _rate(events.get("accepts"), before[1], seconds)
        rtx = _rate(events.get("synack_retransmits"), before[2], seconds)
    wait = wait_ms(listener, summary)
    cells = [
        (f"{listener['queue']}/{listener['backlog']}", None),
        (f"{listener['fill']:.2f}", _fill_colour(listener["fill"], policy)),
        (_number(accepts), None),
        (_number(drops), RED if drops else None),
        (_number(rtx), YELLOW if rtx else None),
        # Established as ss counts them: accepted, and those still queued (the kernel completed them too).
        (str(summary.accepted + summary.queued) if summary is not None else "-", None),
        (str(summary.long_held) if summary is not None else "-", YELLOW if summary and summary.long_held else None),
        (_duration_ms(wait), _wait_colour(wait, policy)),
    ]
    name = cescape(listener["address"], limit=name_width)
    row = ljust(name, name_width) + " " + " ".join(
        _paint(rjust(clip(text, width), width), hue, colour) for (text, hue), (_, width) in zip(cells, COLUMNS,
                                                                                                  strict=True))
    lines = [row]
    advice = advice_line(listener)
    if advice:
        lines.append(clip("  " + advice, columns))
    return lines


def _tcpext_line(now: Mapping[str, int], before: Mapping[str, int] | None, seconds: float, columns: int) -> str:
    parts = []
    for counter, label in TCPEXT_RATES:
        rate = _rate(now.get(counter), before.get(counter) if before else None, seconds)
        parts.append(f"{label} {_number(rate)}")
    return clip("  TcpExt/s: " + "  ".join(parts), columns)


# --- effects: the connections of full listeners, and the loop ---------------------------------------------


def listener_of(row: Mapping[str, Any]) -> Listener:
    """A status document's listener as a record, enough to read its connections."""
    processes = tuple(Process(p["pid"], p["comm"], p["cmdline"], p["unit"]) for p in row["processes"])
    return Listener(row["netns"], row["proto"], row["address"], row["port"], row["queue"], row["backlog"],
                    row["drops"], row["cookie"], row["inode"], row["uid"], processes)


def full_listeners(document: dict[str, Any], policy: Policy, limit: int = CONNECTION_LISTENERS) -> list[Listener]:
    """The listeners full now whose connections a frame reads, worst first, at most ``limit``."""
    full = [row for row in document["listeners"] if row["fill"] >= policy.saturation.fill_ratio]
    return [listener_of(row) for row in full[:limit]]


def connection_summaries(document: dict[str, Any], policy: Policy,
                         accepted_at: AcceptedAt | None = None) -> dict[int, ConnectionSummary]:
    """Cookie -> connections of the listeners full now (reads them: only those few, each frame)."""
    from aqtune.collect import connections, netns

    wanted = full_listeners(document, policy)
    if not wanted:
        return {}
    inodes = {ns["inode"] for ns in document["namespaces"]}
    refs = [ref for ref in netns.list_namespaces() if ref.inode in inodes]
    every = [listener_of(row) for row in document["listeners"]]
    wanted = connections.with_group_members(wanted, every)
    collected = connections.collect(refs, wanted, accepted_at)
    found = connections.summaries(collected, wanted, time.time(), policy.connections.long_after,
                                  policy.connections.idle_after, keep=0)
    return {cookie: summary for (_netns, cookie), summary in found.items()}


def colour_wanted(stream: IO[str]) -> bool:
    """Colour only on a terminal that is not "dumb", and never with NO_COLOR set (no-color.org)."""
    return stream.isatty() and os.environ.get("TERM", "dumb") != "dumb" and "NO_COLOR" not in os.environ


def loop(next_document: Callable[[], dict[str, Any]], policy: Policy, interval: float,
         accept_times: Callable[[], tuple[Any, str | None]] | None = None, stream: IO[str] | None = None,
         frames: int | None = None) -> int:
    """Repaint until interrupted (or ``frames`` frames): home + clear-to-end, no flicker of a full clear.
    ``accept_times`` opens the daemon's eBPF accept times for a frame (cli._accept_times)."""
    out = stream if stream is not None else sys.stdout
    previous: Frame | None = None
    painted = 0
    while frames is None or painted < frames:
        document = next_document()
        times, _ = accept_times() if accept_times is not None else (None, None)
        try:
            summaries = connection_summaries(document, policy, times)
        finally:
            if times is not None:
                times.close()
        size = shutil.get_terminal_size((WIDTH, 24))
        text = render(document, previous, summaries, policy, colour_wanted(out), size.lines, size.columns, interval)
        out.write("\x1b[H\x1b[J" + text + "\n")
        out.flush()
        previous = frame_of(document)
        painted += 1
        if frames is None or painted < frames:
            time.sleep(interval)
    return 0


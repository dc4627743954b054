"""`aqtune trace`: accept-queue events as they happen, one line each, like the bcc tools; or, with
--summary, one line per listener per second that had any, so a busy server's 7,500 connections a
second make a few lines a second rather than 15,000."""

from __future__ import annotations

import math
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TextIO

from aqtune.collect import netns
from aqtune.collect.ebpf import EMIT_ALL, EMIT_DROPS, EVENT_KINDS, Event, EventLayer
from aqtune.text import cescape

KINDS = tuple(EVENT_KINDS.values())  # what --kind accepts, in the kernel's order
DROP_KINDS = frozenset({"ack-overflow", "syn-overflow"})

COLUMNS = "{time:<12} {kind:<14} {netns:<14} {listener:<28} {queue:>13} {peer:<28} {detail}"
HEADER = COLUMNS.format(time="TIME", kind="EVENT", netns="NETNS", listener="LISTENER", queue="QUEUE/BACKLOG",
                        peer="PEER", detail="DETAIL")

# --summary: per listener and second, how many events of each kind (ENQUEUE .. LISTEN, so a column
# per kind), the drops among them, the longest queue any event saw, and the p99 of the accept waits.
SUMMARY_KIND_COLUMNS = {"enqueue": "ENQUEUE", "accept": "ACCEPT", "ack-overflow": "ACK-OVF",
                        "syn-overflow": "SYN-OVF", "synack-retrans": "SYNACK-RT", "listen": "LISTEN"}
SUMMARY_COLUMNS = ("{time:<8} {netns:<14} {listener:<28} {enqueue:>7} {accept:>7} {ack-overflow:>7} "
                   "{syn-overflow:>7} {synack-retrans:>9} {listen:>6} {drops:>7} {queue:>12} {p99:>10}")
SUMMARY_HEADER = SUMMARY_COLUMNS.format(time="TIME", netns="NETNS", listener="LISTENER", drops="DROPS",
                                        queue="PEAK/BACKLOG", p99="WAIT-P99", **{
                                            kind: title for kind, title in SUMMARY_KIND_COLUMNS.items()})
# A second is printed once events stamped in it can no longer arrive: the reader polls every 100 ms,
# and a CPU's perf buffer is read only then.
SUMMARY_LATENESS_NS = 300_000_000
NS = 1_000_000_000


def _endpoint(address: str | None, port: int, family: int) -> str:
    if address is None:
        return "-"
    return f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}"


def _listener(event: Event) -> str:
    # A Unix listener's path is not in the event (it is in sock_diag); its inode names it.
    if event.family == socket.AF_UNIX:
        return f"unix inode {event.inode}"
    return _endpoint(event.local, event.port, event.family)


def detail(event: Event) -> str:
    who = f"pid {event.pid} {cescape(event.comm)}"  # comm is whatever the process called itself
    if event.kind == "accept":
        return f"waited {event.value / 1e6:.1f} ms in the queue ({who})"
    if event.kind == "listen":
        return f"listen(backlog={event.value}) -> effective {event.backlog} ({who})"
    if event.kind == "ack-overflow":
        return "handshake ACK dropped: queue full"
    if event.kind == "syn-overflow":
        return "SYN dropped: queue full"
    if event.kind == "synack-retrans":
        return "SYN-ACK resent: handshake not completed"
    return ""


class NamespaceNames:
    """nsfs inode -> the name status uses, escaped for the terminal (names under /run/netns are
    anyone's choice who may create one); re-read when an unknown namespace shows up."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}

    def __call__(self, inode: int) -> str:
        if inode not in self.names:
            self.names = {ref.inode: cescape(ref.name) for ref in netns.list_namespaces()}
        return self.names.get(inode, str(inode))


# bpf_ktime_get_ns() counts CLOCK_MONOTONIC; this turns it into wall-clock time.
_WALL_MINUS_MONOTONIC = time.time() - time.monotonic()


def _wall(ts_ns: int) -> float:
    return ts_ns / 1e9 + _WALL_MINUS_MONOTONIC


def format_event(event: Event, names: NamespaceNames) -> str:
    when = _wall(event.ts_ns)
    return COLUMNS.format(
        time=time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when * 1000) % 1000:03d}",
        kind=event.kind, netns=names(event.netns), listener=_listener(event),
        queue=f"{event.queue}/{event.backlog}", peer=_endpoint(event.peer, event.peer_port, event.family),
        detail=detail(event),
    )


# --- --summary -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    """One listener's events in one second."""

    netns: int
    listener: str
    counts: dict[str, int] = field(default_factory=dict)
    # Accept waits in ns. Unbounded in principle, bounded in fact: Python decodes at most a few
    # hundred thousand events a second, and the perf buffer drops (and counts) the rest.
    waits_ns: list[int] = field(default_factory=list)
    peak: int = 0
    backlog: int = 0

    def add(self, event: Event) -> None:
        self.counts[event.kind] = self.counts.get(event.kind, 0) + 1
        if event.kind == "accept":
            self.waits_ns.append(event.value)
        self.peak = max(self.peak, event.queue)
        self.backlog = event.backlog


def nearest_rank(values: list[int], fraction: float) -> int:
    """The ``fraction`` quantile of non-empty ``values`` by nearest rank (an observed value)."""
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)), 1) - 1]


class Summary:
    """Events bucketed by the second of their kernel timestamp and by listener (socket inode); a
    second's lines come out once it is over and late events for it can no longer arrive."""

    def __init__(self, names: NamespaceNames, shown: Collection[str], unobserved: Collection[str] = ()) -> None:
        self.names = names
        self.shown = frozenset(shown)  # kinds counted; the others' columns show "-"
        self.unobserved = frozenset(unobserved)  # kinds no probe can see here: "-" too
        self.seconds: dict[int, dict[int, Tally]] = {}

    def add(self, event: Event) -> None:
        listeners = self.seconds.setdefault(event.ts_ns // NS, {})
        tally = listeners.get(event.inode)
        if tally is None:
            tally = listeners[event.inode] = Tally(event.netns, _listener(event))
        tally.add(event)

    def due(self, now_ns: int) -> list[str]:
        """Lines of the seconds over by ``now_ns`` (CLOCK_MONOTONIC) and past the lateness allowance."""
        return self._take(second for second in self.seconds if (second + 1) * NS + SUMMARY_LATENESS_NS <= now_ns)

    def rest(self) -> list[str]:
        """Lines of every second still held, the current one included (at exit)."""
        return self._take(self.seconds)

    def _take(self, seconds: Iterable[int]) -> list[str]:
        lines = []
        for second in sorted(seconds):
            tallies = self.seconds.pop(second)
            # Worst first within a second: most drops, then the most arrivals.
            ordered = sorted(tallies.items(), key=lambda item: (
                -sum(item[1].counts.get(kind, 0) for kind in DROP_KINDS), -item[1].counts.get("enqueue", 0),
                self.names(item[1].netns), item[1].listener, item[0]))
            lines += [self.line(second, tally) for _, tally in ordered]
        return lines

    def _count(self, tally: Tally, kind: str) -> str:
        if kind not in self.shown or kind in self.unobserved:
            return "-"
        return str(tally.counts.get(kind, 0))

    def line(self, second: int, tally: Tally) -> str:
        drop_kinds = DROP_KINDS & (self.shown - self.unobserved)
        drops = str(sum(tally.counts.get(kind, 0) for kind in drop_kinds)) if drop_kinds else "-"
        waits = f"{nearest_rank(tally.waits_ns, 0.99) / 1e6:.1f} ms" if tally.waits_ns else "-"
        return SUMMARY_COLUMNS.format(
            time=time.strftime("%H:%M:%S", time.localtime(_wall(second * NS))), netns=self.names(tally.netns),
            listener=tally.listener, drops=drops, queue=f"{tally.peak}/{tally.backlog}", p99=waits,
            **{kind: self._count(tally, kind) for kind in SUMMARY_KIND_COLUMNS})


# --- the command ---------------------------------------------------------------------------------------


def parse_kinds(values: Iterable[str] | None) -> frozenset[str]:
    """--kind values (repeated or comma-separated) as event kinds; all kinds when none are given.
    Raises ValueError naming the unknown ones and the known ones."""
    if not values:
        return frozenset(KINDS)
    asked = {word.strip() for value in values for word in value.split(",") if word.strip()}
    unknown = sorted(asked - set(KINDS))
    if unknown:
        raise ValueError(f"unknown event kind(s) {', '.join(unknown)}: choose from {', '.join(KINDS)}")
    return frozenset(asked)


def emit_for(kinds: Collection[str]) -> int:
    """The events the kernel must send for ``kinds``: drops alone make far less perf buffer traffic."""
    return EMIT_DROPS if set(kinds) <= DROP_KINDS else EMIT_ALL


def event_filter(namespaces: set[int] | None, port: int | None, kinds: Collection[str]) -> Callable[[Event], bool]:
    def keep(event: Event) -> bool:
        return ((namespaces is None or event.netns in namespaces) and (port is None or event.port == port)
                and event.kind in kinds)
    return keep


def trace(layer: EventLayer, select: str, port: int | None, out: TextIO = sys.stdout,
          kinds: Collection[str] = KINDS, summary: bool = False) -> int:
    """Print events until SIGINT or SIGTERM; ``select`` is a namespace as for status, or "all";
    ``kinds`` the event kinds to show; ``summary`` one line per listener per second instead."""
    names = NamespaceNames()
    wanted_ns = None if select == "all" else {ref.inode for ref in
                                              netns.select_namespaces(netns.list_namespaces(), select)}
    keep = event_filter(wanted_ns, port, kinds)
    unobserved = () if layer.syn_overflow_seen else ("syn-overflow",)
    tallies = Summary(names, kinds, unobserved)

    def show(event: Event) -> None:
        if keep(event):
            print(format_event(event, names), file=out, flush=True)

    def count(event: Event) -> None:
        if keep(event):
            tallies.add(event)

    def flush(lines: list[str]) -> None:
        if lines:
            print("\n".join(lines), file=out, flush=True)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"aqtune trace: {layer.mode}", file=sys.stderr)
    for probe, state in layer.probes.items():
        if not state.attached:
            print(f"  {probe}: {state.text}", file=sys.stderr)
    if summary:
        print("aqtune trace: per listener and second: events of each kind, drops, the longest queue seen and "
              "the p99 of accept() waits; '-' where not asked for or not observable", file=sys.stderr)
    print(SUMMARY_HEADER if summary else HEADER, file=out, flush=True)
    layer.on_event(count if summary else show)
    while not stop.is_set():
        layer.poll(100)
        if summary:
            flush(tallies.due(time.monotonic_ns()))
    if summary:
        layer.poll(0)
        flush(tallies.rest())
    if layer.lost:
        print(f"aqtune trace: {layer.lost} events lost (perf buffer full)", file=sys.stderr)
    return 0

"""`aqtune trace`: accept-queue events as they happen, one line each, like the bcc tools."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import TextIO

from aqtune.collect import netns
from aqtune.collect.ebpf import Event, EventLayer

COLUMNS = "{time:<12} {kind:<14} {netns:<14} {listener:<28} {queue:>13} {peer:<28} {detail}"
HEADER = COLUMNS.format(time="TIME", kind="EVENT", netns="NETNS", listener="LISTENER", queue="QUEUE/BACKLOG",
                        peer="PEER", detail="DETAIL")


def _endpoint(address: str | None, port: int, family: int) -> str:
    if address is None:
        return "-"
    return f"[{address}]:{port}" if family == 10 else f"{address}:{port}"


def detail(event: Event) -> str:
    who = f"pid {event.pid} {event.comm}"
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
    """nsfs inode -> the name status uses; re-read when an unknown namespace shows up."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}

    def __call__(self, inode: int) -> str:
        if inode not in self.names:
            self.names = {ref.inode: ref.name for ref in netns.list_namespaces()}
        return self.names.get(inode, str(inode))


# bpf_ktime_get_ns() counts CLOCK_MONOTONIC; this turns it into wall-clock time.
_WALL_MINUS_MONOTONIC = time.time() - time.monotonic()


def format_event(event: Event, names: NamespaceNames) -> str:
    when = event.ts_ns / 1e9 + _WALL_MINUS_MONOTONIC
    return COLUMNS.format(
        time=time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when * 1000) % 1000:03d}",
        kind=event.kind, netns=names(event.netns), listener=_endpoint(event.local, event.port, event.family),
        queue=f"{event.queue}/{event.backlog}", peer=_endpoint(event.peer, event.peer_port, event.family),
        detail=detail(event),
    )


def trace(layer: EventLayer, select: str, port: int | None, out: TextIO = sys.stdout) -> int:
    """Print events until SIGINT or SIGTERM; ``select`` is a namespace as for status, or "all"."""
    names = NamespaceNames()
    wanted_ns = None if select == "all" else {ref.inode for ref in
                                              netns.select_namespaces(netns.list_namespaces(), select)}

    def show(event: Event) -> None:
        if wanted_ns is not None and event.netns not in wanted_ns:
            return
        if port is not None and event.port != port:
            return
        print(format_event(event, names), file=out, flush=True)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"aqtune trace: {layer.mode}", file=sys.stderr)
    for probe, state in layer.probes.items():
        if not state.attached:
            print(f"  {probe}: {state.text}", file=sys.stderr)
    print(HEADER, file=out, flush=True)
    layer.on_event(show)
    while not stop.is_set():
        layer.poll(100)
    if layer.lost:
        print(f"aqtune trace: {layer.lost} events lost (perf buffer full)", file=sys.stderr)
    return 0

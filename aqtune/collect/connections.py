"""A listener's connections: who is connected, for how long, how idle, and which process holds each.

Read only when someone asks (`aqtune connections`) or, in the daemon, for saturated listeners: the
sweep itself never dumps connections, so its cost stays that of the listeners alone. TCP connections
come from a sock_diag dump of established sockets filtered in the kernel to the listeners' ports,
with tcp_info (idle times, byte counts); Unix ones from a dump of connected sockets, whose accepted
end carries its listener's name and file. Each connection is matched to its listener by namespace,
protocol and local address and port (an exact address first, else the wildcard one), or by name and
file. The processes holding them come from one /proc fd scan for just those sockets, and their
accept times from the eBPF layer where it runs.

``match_tcp``, ``match_unix`` and ``summarize_connections`` are pure; ``collect`` and ``summarize``
do the I/O.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from aqtune.collect import netlink, netns, procfs, sockdiag
from aqtune.records import Connection, ConnectionSummary, Listener, Namespace, Process

ListenerKey = tuple[str, int]  # (netns, socket cookie), as model.history keys listeners
AcceptedAt = Callable[[Iterable[int]], dict[int, float]]  # eBPF: socket inode -> wall-clock accept time
TOP = 20  # connections a summary keeps by default, worst first
MAX_ROWS = 100_000  # connections one dump keeps per namespace; the rest are counted as unread
WILDCARD = {"tcp": "0.0.0.0", "tcp6": "[::]"}
AGES_EBPF = "ebpf"
AGES_NONE = "none"
# /proc/PID/fdinfo of an epoll instance: one "tfd: FD events: ... ino:INODE(hex) sdev:..." line per watched file.
_EPOLL_TARGET = re.compile(rb"^tfd:.*\bino:([0-9a-f]+)", re.MULTILINE)
EPOLL_FDINFO_MAX = 1 << 20  # a line is ~80 bytes: some 13,000 watched descriptors
MAX_EPOLL_FDS = 16  # epoll instances read per process


@dataclass(slots=True)
class Collected:
    """Every asked listener's connections (a reuseport group's members share theirs), with what could not
    be read."""

    connections: dict[ListenerKey, list[Connection]] = field(default_factory=dict)
    shared: dict[ListenerKey, int] = field(default_factory=dict)  # members of the group counted together
    unread: dict[str, int] = field(default_factory=dict)  # netns -> connections past MAX_ROWS
    errors: dict[str, str] = field(default_factory=dict)  # netns -> why its connections could not be read
    ages: str = AGES_NONE


def split_address(address: str) -> tuple[str, int]:
    """("127.0.0.1", 8080) from "127.0.0.1:8080", ("[::1]", 443) from "[::1]:443"."""
    host, _, port = address.rpartition(":")
    return host, int(port)


def _base(host: str) -> str:
    """The address without an interface name: "127.0.0.1%eth0" -> "127.0.0.1"."""
    return host.split("%", 1)[0]


def match_tcp(listeners: Iterable[Listener], connections: Iterable[Connection]) -> dict[ListenerKey, list[Connection]]:
    """Each TCP connection under the listeners that accepted it: same namespace, protocol and port,
    the listener's own address first, else the wildcard one (the kernel prefers the more specific
    listener alike). Several listeners on one address (an SO_REUSEPORT group) all get the connection:
    nothing in sock_diag tells which of them queued it."""
    index: dict[tuple[str, str, int, str], list[Listener]] = {}
    for listener in listeners:
        if listener.proto in WILDCARD and listener.port is not None:
            host, port = split_address(listener.address)
            index.setdefault((listener.netns, listener.proto, port, _base(host)), []).append(listener)
    found: dict[ListenerKey, list[Connection]] = {}
    for connection in connections:
        host, port = split_address(connection.local)
        key = (connection.netns, connection.proto, port, _base(host))
        owners = index.get(key) or index.get((*key[:3], WILDCARD[connection.proto]))
        for listener in owners or ():
            found.setdefault((listener.netns, listener.cookie), []).append(connection)
    return found


def match_unix(netns_name: str, listeners: Iterable[Listener],
               sockets: Iterable[sockdiag.UnixSocket]) -> dict[ListenerKey, list[Connection]]:
    """Each accepted Unix connection under its listener: the accepted socket carries the listener's name
    and, for a path, its file, so one bound again to a path (a new file) keeps its own connections."""
    sockets = list(sockets)
    files = {s.inode: (s.name, s.vfs) for s in sockets if s.listening}
    by_file: dict[tuple[str, tuple[int, int] | None], list[Listener]] = {}
    for listener in listeners:
        if listener.proto == "unix" and listener.netns == netns_name and listener.inode in files:
            by_file.setdefault(files[listener.inode], []).append(listener)
    found: dict[ListenerKey, list[Connection]] = {}
    for s in sockets:
        if s.listening:
            continue
        owners = by_file.get((s.name, s.vfs))
        if not owners:
            continue
        connection = Connection(netns_name, "unix", s.name, f"socket:[{s.peer}]" if s.peer else "-", "established",
                                s.inode, s.cookie, s.uid, rqueue=s.rqueue, wqueue=s.wqueue, peer_inode=s.peer)
        for listener in owners:
            found.setdefault((listener.netns, listener.cookie), []).append(connection)
    return found


def _read_namespace(ref: netns.NamespaceRef, listeners: Sequence[Listener], collected: Collected) -> None:
    tcp_ports = {proto: {l.port for l in listeners if l.proto == proto and l.port is not None}
                 for proto in WILDCARD}
    wants_unix = any(l.proto == "unix" for l in listeners)
    rows: list[Connection] = []
    unix: list[sockdiag.UnixSocket] = []
    unread = 0
    with netns.entered(ref), netlink.open_diag_socket() as sock:
        ifnames = dict(socket.if_nameindex())
        for proto, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
            if tcp_ports[proto]:
                progress = netlink.dump_into(
                    sock, sockdiag.inet_connections_request(family, tcp_ports[proto]),
                    sockdiag.ConnectionDump(ref.name, limit=MAX_ROWS - len(rows), ifnames=ifnames),
                    sockdiag.decode_inet_connections)
                rows += progress.rows
                unread += progress.unread
        if wants_unix:
            try:
                done = netlink.dump_into(sock, sockdiag.unix_connections_request(),
                                         sockdiag.UnixDump(ref.name, limit=MAX_ROWS),
                                         sockdiag.decode_unix_sockets)
                unix, unread = done.rows, unread + done.unread
            except sockdiag.NetlinkError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                collected.errors[ref.name] = "unix_diag unavailable (modprobe unix_diag): Unix connections not shown"
    if unread:
        collected.unread[ref.name] = unread
    for key, found in (match_tcp(listeners, rows) | match_unix(ref.name, listeners, unix)).items():
        collected.connections[key] = found


def _groups(listeners: Sequence[Listener]) -> dict[ListenerKey, int]:
    """How many listeners share each one's namespace, protocol and address (TCP: an SO_REUSEPORT group)."""
    counts: dict[tuple[str, str, str], int] = {}
    for listener in listeners:
        counts[(listener.netns, listener.proto, listener.address)] = (
            counts.get((listener.netns, listener.proto, listener.address), 0) + 1)
    return {(l.netns, l.cookie): counts[(l.netns, l.proto, l.address)] if l.proto in WILDCARD else 1
            for l in listeners}


def with_group_members(wanted: Iterable[Listener], every: Iterable[Listener]) -> list[Listener]:
    """``wanted`` and the other members of their SO_REUSEPORT groups among ``every``: a group's
    connections are one pool, counted for all its members, so collect() needs them all."""
    keys = {(l.netns, l.proto, l.address) for l in wanted if l.proto in WILDCARD}
    chosen = {(l.netns, l.cookie): l for l in wanted}
    for listener in every:
        if (listener.netns, listener.proto, listener.address) in keys:
            chosen.setdefault((listener.netns, listener.cookie), listener)
    return list(chosen.values())


def epoll_watchers(pids: Iterable[int], inodes: set[int], proc: str = "/proc") -> dict[int, set[int]]:
    """Socket inode -> the pids among ``pids`` whose epoll instances watch it.

    Holding a listener is not serving it: nginx's workers inherit every socket of a reuseport group and
    each puts only its own in its epoll set. So for an event-driven server this says which process
    accepts on which socket; a process that accepts without epoll (a blocking accept(), poll()) shows
    for none."""
    found: dict[int, set[int]] = {}
    for pid in set(pids):
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except OSError:
            continue
        instances = 0
        for fd in fds:
            try:
                if os.readlink(f"{proc}/{pid}/fd/{fd}") != "anon_inode:[eventpoll]":
                    continue
                instances += 1
                if instances > MAX_EPOLL_FDS:
                    break
                data, _ = procfs.read_bounded(f"{proc}/{pid}/fdinfo/{fd}", EPOLL_FDINFO_MAX)
            except OSError:
                continue
            for match in _EPOLL_TARGET.finditer(data):
                inode = int(match.group(1), 16)
                if inode in inodes:
                    found.setdefault(inode, set()).add(pid)
    return found


def serving(listeners: Iterable[Listener], proc: str = "/proc") -> dict[int, set[int]]:
    """Listener inode -> the holders whose epoll sets watch it (epoll_watchers over their holders): for
    reuseport_stalled, which names the process that serves the full socket."""
    listeners = list(listeners)
    return epoll_watchers({p.pid for l in listeners for p in l.processes}, {l.inode for l in listeners}, proc)


def refs_of(namespaces: Iterable[Namespace]) -> list[netns.NamespaceRef]:
    """The references a sweep's namespaces were read through, to enter them again."""
    return [netns.NamespaceRef(ns.name, ns.inode, ns.path, ns.cookie) for ns in namespaces if ns.path]


def collect(refs: Sequence[netns.NamespaceRef], listeners: Sequence[Listener], accepted_at: AcceptedAt | None = None,
            owners: bool = True, proc: str = "/proc") -> Collected:
    """The connections of ``listeners`` (each read in its own namespace, found in ``refs``), with the
    processes holding them (``owners``) and, with ``accepted_at`` (the eBPF layer's), their accept times.
    Give every member of a reuseport group (with_group_members()), or ``shared`` undercounts it.

    A namespace that vanished or cannot be read is reported in ``errors``; PermissionError (not root)
    is raised."""
    collected = Collected(ages=AGES_EBPF if accepted_at is not None else AGES_NONE)
    by_netns: dict[str, list[Listener]] = {}
    for listener in listeners:
        by_netns.setdefault(listener.netns, []).append(listener)
    shared = _groups(listeners)
    for ref in refs:
        members = by_netns.get(ref.name)
        if not members:
            continue
        try:
            _read_namespace(ref, members, collected)
        except PermissionError:
            raise
        except netns.NamespaceGone as exc:
            collected.errors[ref.name] = f"vanished ({exc})"
        except (OSError, sockdiag.NetlinkError) as exc:
            collected.errors[ref.name] = f"connections could not be read: {exc}"
    collected.shared = {key: shared.get(key, 1) for key in collected.connections}
    inodes = connection_inodes(collected)
    holders = procfs.find_owners(inodes, proc) if owners and inodes else {}
    complete(collected, holders, accepted_at(inodes) if accepted_at is not None and inodes else {})
    return collected


def connection_inodes(collected: Collected) -> set[int]:
    """The inodes of every accepted connection collected (queued ones have none yet)."""
    return {c.inode for found in collected.connections.values() for c in found if c.inode}


def complete(collected: Collected, holders: Mapping[int, tuple[Process, ...]], accepted: Mapping[int, float]) -> None:
    """Fill in the processes holding each connection and its accept time, by socket inode."""
    if not holders and not accepted:
        return
    done: dict[int, Connection] = {}  # a reuseport group's members share the same records
    for key, found in collected.connections.items():
        collected.connections[key] = [_complete(c, holders, accepted, done) for c in found]


def _complete(connection: Connection, holders: Mapping[int, tuple[Process, ...]],
              accepted: Mapping[int, float], done: dict[int, Connection]) -> Connection:
    if not connection.inode:
        return connection
    complete = done.get(connection.inode)
    if complete is None:
        complete = done[connection.inode] = dataclasses.replace(
            connection, holders=holders.get(connection.inode, ()), accepted_at=accepted.get(connection.inode))
    return complete


# --- summaries (pure) ------------------------------------------------------------------------------------


def open_for(connection: Connection, now: float) -> float | None:
    """How long it has been open: its eBPF age, else what tcp_info proves (a lower bound), else None."""
    age = connection.age(now)
    return age if age is not None else connection.min_age


def is_long_held(connection: Connection, now: float, long_after: float) -> bool:
    """Open longer than ``long_after``, as its eBPF age or tcp_info's lower bound on it shows."""
    known = open_for(connection, now)
    return known is not None and known >= long_after


def is_idle(connection: Connection, idle_after: float) -> bool:
    """Nothing received from the client for ``idle_after`` seconds (TCP only: Unix sockets keep no times)."""
    return connection.recv_idle is not None and connection.recv_idle >= idle_after


def is_answered(connection: Connection) -> bool:
    """The server sent data after the client's last: a keep-alive connection waiting for the next request."""
    return (connection.send_idle is not None and connection.recv_idle is not None and bool(connection.bytes_out)
            and connection.send_idle < connection.recv_idle)


def worst_first(connections: Iterable[Connection], now: float, long_after: float,
                idle_after: float) -> list[Connection]:
    """Accepted ones before queued ones; long-held or idle before the rest; then the longest open, the
    longest idle."""
    def key(c: Connection) -> tuple[bool, bool, float, float]:
        held = is_long_held(c, now, long_after) or is_idle(c, idle_after)
        return (c.queued, not held, -(open_for(c, now) or 0.0), -(c.recv_idle or 0.0))
    return sorted(connections, key=key)


def summarize_connections(connections: Sequence[Connection], now: float, long_after: float, idle_after: float,
                          ages: str = AGES_NONE, keep: int = TOP, shared: int = 1,
                          unread: int = 0) -> ConnectionSummary:
    """Counts over ``connections`` and the ``keep`` worst (keep < 0: all)."""
    accepted = [c for c in connections if not c.queued]
    queued = [c for c in connections if c.queued]
    long_held = [c for c in accepted if is_long_held(c, now, long_after)]
    idle = [c for c in accepted if is_idle(c, idle_after)]
    held = list({id(c): c for c in long_held + idle}.values())
    opened = [t for t in (open_for(c, now) for c in accepted) if t is not None]
    waited = [t for t in (c.min_age for c in queued) if t is not None]
    ordered = worst_first(connections, now, long_after, idle_after)
    top = ordered if keep < 0 else ordered[:keep]
    return ConnectionSummary(
        taken_at=now, accepted=len(accepted), queued=len(queued), long_held=len(long_held), idle=len(idle),
        held=len(held), answered=sum(is_answered(c) for c in held),
        held_by=tuple(sorted({p.pid for c in held for p in c.holders})),
        busy=tuple(sorted({p.pid for c in accepted for p in c.holders})),
        oldest=max(opened) if opened else None, oldest_queued=max(waited) if waited else None,
        ages=ages, long_after=long_after, idle_after=idle_after, shared=shared,
        top=tuple(top), more=len(ordered) - len(top), unread=unread,
    )


def summaries(collected: Collected, listeners: Iterable[Listener], now: float, long_after: float, idle_after: float,
              keep: int = TOP) -> dict[ListenerKey, ConnectionSummary]:
    """A summary per listener, keyed like model.history's listeners: an all-zero one for a listener
    with no connection, none for one whose namespace could not be read."""
    found = {}
    for listener in listeners:
        key = (listener.netns, listener.cookie)
        if listener.netns in collected.errors and key not in collected.connections:
            continue
        found[key] = summarize_connections(collected.connections.get(key, []), now, long_after, idle_after,
                                           collected.ages, keep, collected.shared.get(key, 1),
                                           collected.unread.get(listener.netns, 0))
    return found


def summarize(namespaces: Iterable[Namespace], listeners: Sequence[Listener], long_after: float, idle_after: float,
              accepted_at: AcceptedAt | None = None, now: float | None = None,
              keep: int = TOP) -> dict[ListenerKey, ConnectionSummary]:
    """For the daemon: summaries of ``listeners``' connections, with the processes holding them and,
    with ``accepted_at`` (EventLayer.accepted_at), their ages. Call it for saturated listeners only (with
    their reuseport siblings: with_group_members()): it dumps their connections and scans /proc."""
    collected = collect(refs_of(namespaces), listeners, accepted_at)
    return summaries(collected, listeners, time.time() if now is None else now, long_after, idle_after, keep)

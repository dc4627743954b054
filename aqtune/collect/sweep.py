"""Observation sweeps: every listener, its owners and its namespace's figures, as records.

``sweep`` reads everything once (one-shot `aqtune status`). The daemon's ``Sweeper`` reads within a
budget, because any local user can create namespaces and listeners by the thousand (`unshare -rn`
needs no privilege) and each namespace's TCP dump walks the kernel's host-wide listen table:

- a time budget and a number of namespaces per sweep; what a sweep did not reach is read first in
  the next one (oldest read first), so every namespace is read within a bounded number of sweeps;
- a namespace where the last read found no listener is looked at again at most every IDLE_REVISIT
  seconds (IDLE_PER_SWEEP of them in every sweep, in turn), and then read only if it holds a TCP
  or Unix socket (``/proc/net/protocols`` counts them per namespace); a namespace without such
  sockets costs no dump in any read;
- a namespace the budget did not reach keeps its last rows in the snapshot, marked stale: the model
  forgets listeners missing from a snapshot, and a namespace merely not read must not lose its
  history;
- at most ``listeners`` rows are tracked: those with a queue first, then the quiet ones, services'
  before users' in each, and within the rank that does not fit whole, round-robin by socket cookie,
  so each is seen now and then.
"""

from __future__ import annotations

import errno
import heapq
import socket
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from aqtune.collect import fdwalk, netlink, netns, procfs, sockdiag
from aqtune.records import SYSTEM_UID_MAX, Listener, Namespace, Snapshot

IDLE_REVISIT = 30.0  # seconds at most between looks at a namespace whose last read found no listener
IDLE_PER_SWEEP = 64  # such namespaces looked at in every sweep besides, the longest unchecked first
MIN_VISITS = 2  # namespaces read per sweep whatever the budget says (the host and the oldest other): progress
# /proc/net/protocols "sockets" column: sockets of each protocol in the reading thread's namespace.
# Unix stream sockets are "UNIX-STREAM" since 5.15 and "UNIX" before; seqpacket ones are "UNIX".
TCP_PROTOCOLS = ("TCP", "TCPv6")
UNIX_PROTOCOLS = ("UNIX", "UNIX-STREAM")


def parse_protocols(text: str) -> dict[str, int]:
    """Socket count per protocol from /proc/net/protocols (header line, then one line per protocol)."""
    counts = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 2 and fields[2].isdigit():
            counts[fields[0]] = int(fields[2])
    return counts


def has_sockets(counts: Mapping[str, int] | None, protocols: tuple[str, ...]) -> bool:
    """Whether a dump for ``protocols`` can find anything; unknown (no file, no line) means yes."""
    if counts is None or protocols[0] not in counts:
        return True
    return any(counts.get(name, 0) > 0 for name in protocols)


def _socket_counts() -> dict[str, int] | None:
    try:
        with open("/proc/thread-self/net/protocols", "rb") as f:
            return parse_protocols(f.read().decode("ascii", "replace"))
    except OSError:
        return None


def read_namespace(ref: netns.NamespaceRef, into: Kept | None = None,
                   chunks: netlink.ChunkCache | None = None) -> tuple[Namespace, list[Listener]]:
    """Listeners, sysctls and TcpExt counters of one namespace, read from inside it.

    With ``into``, the listeners go there as they are decoded (and the list returned is empty), so a
    namespace of any size costs the memory of what ``into`` keeps.
    """
    rows: list[Listener] = []
    drain = into.offer if into is not None else None
    offered = into.offered if into is not None else 0
    namespace = Namespace(ref.name, ref.inode, path=ref.path, read_at=time.time(), cookie=ref.cookie,
                          user_owned=ref.user_owned, owner_uid=ref.owner_uid)
    skipped = 0
    with netns.entered(ref):
        namespace.sysctls = procfs.read_sysctls()
        namespace.counters = procfs.read_counters()
        counts = _socket_counts()
        # The socket is opened even where no dump is needed: sock_diag refused is worth saying anywhere.
        with netlink.open_diag_socket() as sock:
            if has_sockets(counts, TCP_PROTOCOLS):
                ifnames = dict(socket.if_nameindex())
                for family in (socket.AF_INET, socket.AF_INET6):
                    skipped += netlink.dump(sock, sockdiag.inet_listen_request(family), sockdiag.decode_inet,
                                            ref.name, rows, ifnames, drain, chunks)
            if has_sockets(counts, UNIX_PROTOCOLS):
                try:
                    skipped += netlink.dump(sock, sockdiag.unix_listen_request(), sockdiag.decode_unix,
                                            ref.name, rows, drain=drain, chunks=chunks)
                except sockdiag.NetlinkError as exc:
                    # unix_diag is a module; without it TCP is still worth reporting.
                    if exc.errno != errno.ENOENT:
                        raise
                    namespace.error = "unix_diag unavailable (modprobe unix_diag): Unix listeners not shown"
    namespace.listeners = len(rows) + (into.offered - offered if into is not None else 0)
    namespace.skipped_messages = skipped
    return namespace, rows


def _without_sockets(ref: netns.NamespaceRef) -> bool:
    """Whether the namespace holds no TCP or Unix socket at all, so no listener (False when unsure)."""
    try:
        with netns.entered(ref):
            counts = _socket_counts()
    except (netns.NamespaceGone, OSError):
        return False
    return counts is not None and not has_sockets(counts, TCP_PROTOCOLS) and not has_sockets(counts, UNIX_PROTOCOLS)


def _read(ref: netns.NamespaceRef, into: Kept | None = None,
          chunks: netlink.ChunkCache | None = None) -> tuple[Namespace, list[Listener]]:
    """read_namespace, with a namespace that vanished or cannot be read reported in its record."""
    try:
        return read_namespace(ref, into, chunks)
    except netns.NamespaceGone as exc:
        return Namespace(ref.name, ref.inode, error=f"vanished during the sweep ({exc})", cookie=ref.cookie), []
    except PermissionError:
        raise
    except (OSError, sockdiag.NetlinkError) as exc:
        return Namespace(ref.name, ref.inode, path=ref.path, error=f"could not be read: {exc}", cookie=ref.cookie), []


def _with_owners(listeners: list[Listener], started: float, owners: bool,
                 owner_cache: procfs.OwnerCache | None, background: fdwalk.BackgroundScan | None = None,
                 complete: bool = False) -> None:
    if owners:
        inodes = {listener.inode for listener in listeners}
        found = (owner_cache.lookup(inodes, started, complete) if owner_cache
                 else procfs.find_owners(inodes, background=background))
        for listener in listeners:
            listener.processes = found.get(listener.inode, ())


def sweep(select: str | netns.Selection = "all", owners: bool = True,
          owner_cache: procfs.OwnerCache | None = None, background: fdwalk.BackgroundScan | None = None) -> Snapshot:
    """Read every selected namespace; a namespace that vanishes mid-sweep is reported, not fatal.
    ``background``: the owners' /proc walk already under way (fdwalk.BackgroundScan).

    Raises LookupError for an unknown ``select`` and PermissionError when not privileged enough.
    """
    started = time.time()
    clock = time.perf_counter()
    refs = netns.select_namespaces(netns.list_namespaces(), select)
    namespaces: list[Namespace] = []
    listeners: list[Listener] = []
    for ref in refs:
        namespace, rows = _read(ref)
        namespaces.append(namespace)
        listeners.extend(rows)
    _with_owners(listeners, started, owners, owner_cache, background)
    return Snapshot(started, time.perf_counter() - clock, namespaces, listeners)


# --- the daemon's bounded sweeps ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SweepBudget:
    """What one sweep may do (the policy's [limits], and the watchdog's period)."""

    seconds: float = 2.0
    namespaces: int = 500
    listeners: int = 20_000


@dataclass(slots=True)
class Visit:
    """A namespace as last read, and the rows of it the daemon tracks."""

    namespace: Namespace
    rows: list[Listener]
    at: float  # monotonic time of the read

    @property
    def idle(self) -> bool:
        """Nothing to watch there at the last read: read again only every IDLE_REVISIT."""
        return self.namespace.listeners == 0 and self.namespace.error is None


def plan_visits(refs: list[netns.NamespaceRef], visits: Mapping[netns.NamespaceRef, Visit], now: float,
                focus: Collection[netns.NamespaceRef] | None = None) -> list[netns.NamespaceRef]:
    """The namespaces due in this sweep, in the order to read them (pure).

    ``focus`` (counters moved there) limits a sweep to those namespaces. Otherwise every namespace
    is due except an idle one looked at less than IDLE_REVISIT ago, of which IDLE_PER_SWEEP are due
    anyway. The host's comes first, then those never read, then the longest unread: a sweep cut
    short leaves the freshest for later. Of those never read, the host's own (a service's, a
    container root started) come before those of user namespaces: any local user can make
    thousands of those (`unshare -rn`), and under the CPU budget reading them all takes a minute
    or more, which must not delay the first read of a service's new namespace.
    """
    if focus is not None:
        due = [ref for ref in refs if ref in focus]
    else:
        due, waiting = [], []
        for ref in refs:
            visit = visits.get(ref)
            if visit is None or not visit.idle or now - visit.at >= IDLE_REVISIT:
                due.append(ref)
            else:
                waiting.append(ref)
        # A few idle ones every sweep besides: on a host with a handful of namespaces, a listener
        # opened in an empty one shows at the next sweep, not IDLE_REVISIT later.
        waiting.sort(key=lambda ref: visits[ref].at)
        due += waiting[:IDLE_PER_SWEEP]

    def order(ref: netns.NamespaceRef) -> tuple[bool, int, float]:
        visit = visits.get(ref)
        if visit is not None:
            return ref.name != "host", 2, visit.at
        return ref.name != "host", int(ref.user_owned), float("-inf")

    return sorted(due, key=order)


def _rank(listener: Listener) -> int:
    """Which listeners the budget keeps first: any with a queue (trouble, or about to be), then the
    quiet ones; services' (sockets no user can create) before users' in each, so a user's listeners
    can crowd out neither a service in trouble nor, while they are quiet, a quiet service."""
    user = listener.uid is not None and listener.uid > SYSTEM_UID_MAX
    return (0 if listener.queue > 0 else 2) + user


_COOKIES = 1 << 64


class Kept:
    """At most ``limit`` listeners, chosen as they are offered: by rank, and within the rank that does
    not fit whole, round-robin by socket cookie from just after ``cursor`` (the next sweep resumes
    after the last one kept). Holds no more than ``limit`` rows whatever is offered."""

    def __init__(self, limit: int, cursor: int) -> None:
        self.limit = max(limit, 1)
        self.cursor = cursor
        self.offered = 0
        self._rows: list[Listener] = []  # while under the limit, in the order offered
        # Past it, a heap whose top is the least wanted row kept: (negated priority, tie-break, row).
        self._heap: list[tuple[tuple[int, int], int, Listener]] = []

    def _priority(self, row: Listener) -> tuple[int, int]:
        return _rank(row), (row.cookie - self.cursor - 1) % _COOKIES

    def offer(self, rows: Iterable[Listener]) -> None:
        heap = self._heap
        for row in rows:
            self.offered += 1
            if not heap:
                if len(self._rows) < self.limit:
                    self._rows.append(row)
                    continue
                heap[:] = [(self._negated(kept), -index, kept) for index, kept in enumerate(self._rows)]
                heapq.heapify(heap)
                self._rows = []
            rank, turn = self._priority(row)
            least = heap[0][0]
            if (-rank, -turn) > least:
                heapq.heapreplace(heap, ((-rank, -turn), -self.offered, row))

    def _negated(self, row: Listener) -> tuple[int, int]:
        rank, turn = self._priority(row)
        return -rank, -turn

    def result(self) -> tuple[list[Listener], int]:
        """The rows kept and the cursor for the next sweep."""
        if not self._heap:
            return list(self._rows), self.cursor
        ordered = sorted(self._heap, key=lambda entry: entry[:2], reverse=True)
        return [row for _, _, row in ordered], ordered[-1][2].cookie


def select_listeners(rows: list[Listener], limit: int, cursor: int) -> tuple[list[Listener], int]:
    """At most ``limit`` of ``rows`` as Kept chooses them, and the cursor for next time (pure)."""
    kept = Kept(limit, cursor)
    kept.offer(rows)
    return kept.result()


@dataclass(slots=True)
class Sweeper:
    """The daemon's sweeps: bounded by ``budget``, resuming where the last one stopped.

    Memory is bounded by what it tracks: one Visit per namespace that exists (its rows within the
    listener budget in all); a namespace that disappears is forgotten at the next sweep.
    """

    budget: SweepBudget = field(default_factory=SweepBudget)
    progress: Callable[[], None] = lambda: None  # called between namespaces: the daemon feeds its watchdog
    visits: dict[netns.NamespaceRef, Visit] = field(default_factory=dict)
    cursor: int = -1  # socket cookie after which the listener round-robin resumes
    read: list[netns.NamespaceRef] = field(default_factory=list)  # the namespaces the last sweep read
    clock: Callable[[], float] = time.monotonic
    chunks: netlink.ChunkCache = field(default_factory=netlink.ChunkCache)  # the last sweep's decoded replies

    def sweep(self, select: str | netns.Selection = "all", owner_cache: procfs.OwnerCache | None = None,
              focus: Collection[netns.NamespaceRef] | None = None) -> Snapshot:
        """One sweep within the budget; with ``focus``, only those namespaces are read (the rest
        stand in from earlier sweeps)."""
        started, clock = time.time(), time.perf_counter()
        self.chunks.rotate()
        by_processes = not isinstance(select, netns.Selection) or select.by_processes
        refs = netns.select_namespaces(netns.list_namespaces(processes=by_processes), select)
        for gone in self.visits.keys() - set(refs):
            del self.visits[gone]
        now = self.clock()
        due = plan_visits(refs, self.visits, now, focus)
        kept = Kept(self.budget.listeners, self.cursor)
        fresh: dict[netns.NamespaceRef, Namespace] = {}
        rechecked = 0
        for index, ref in enumerate(due):
            # A look at an idle namespace is cheap: only the time budget counts it.
            if index >= MIN_VISITS and (len(fresh) >= self.budget.namespaces
                                        or time.perf_counter() - clock >= self.budget.seconds):
                break
            self.progress()
            visit = self.visits.get(ref)
            if visit is not None and visit.idle and _without_sockets(ref):
                visit.at = now  # still nothing there: a setns and one file read, not a whole read
                rechecked += 1
                continue
            namespace, _ = _read(ref, kept, self.chunks)
            fresh[ref] = namespace
            if namespace.error and namespace.error.startswith("vanished"):
                self.visits.pop(ref, None)
                continue
            self.visits[ref] = Visit(namespace, [], now)
        self.read = [ref for ref in fresh if ref in self.visits]
        skipped = len(due) - len(fresh) - rechecked
        namespaces: list[Namespace] = []
        tracked: list[netns.NamespaceRef] = list(self.read)
        idle = 0
        for ref in refs:
            if ref in fresh:
                namespaces.append(fresh[ref])
                continue
            visit = self.visits.get(ref)
            if visit is None or visit.idle:
                idle += visit is not None
                continue
            # Not read this time: its last figures and rows stand in, so its history goes on.
            namespaces.append(replace(visit.namespace, stale=True))
            kept.offer(visit.rows)
            tracked.append(ref)
        self.progress()
        listeners, self.cursor = kept.result()
        # What stands in for a namespace later is what is tracked now: within the budget in all.
        by_name: dict[str, list[Listener]] = {}
        for row in listeners:
            by_name.setdefault(row.netns, []).append(row)
        for ref in tracked:
            self.visits[ref].rows = by_name.get(ref.name, [])
        # Counted against every listener its namespace held when read, so a namespace standing in with the
        # rows it was trimmed to still says how many it has.
        untracked = max(sum(ns.listeners for ns in namespaces) - len(listeners), 0)
        _with_owners(listeners, started, True, owner_cache, complete=skipped == 0 and untracked == 0)
        return Snapshot(started, time.perf_counter() - clock, namespaces, listeners, partial=skipped > 0,
                        skipped_namespaces=skipped, skipped_listeners=untracked, idle_namespaces=idle)

    def watched(self) -> list[netns.NamespaceRef]:
        """Namespaces where the last read found listeners (the host's first): the ones whose counters
        are worth checking between sweeps."""
        found = [ref for ref, visit in self.visits.items() if not visit.idle and visit.namespace.error is None]
        return sorted(found, key=lambda ref: ref.name != "host")


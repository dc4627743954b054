"""Typed records of one observation sweep: what every later layer consumes.

They hold kernel figures as read, with no interpretation beyond the fill ratio, so the model and the
policy can be tested on hand-built records without a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The sysctls and TcpExt counters each namespace reports, in display order.
SYSCTLS = (
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.tcp_abort_on_overflow",
)
COUNTERS = (
    "ListenOverflows",
    "ListenDrops",
    "TCPReqQFullDrop",
    "TCPReqQFullDoCookies",
    "SyncookiesSent",
    "SyncookiesFailed",
    "TCPSynRetrans",
)
SYSTEM_UID_MAX = 999  # Debian's SYS_UID_MAX: sockets of uids above it are people's, not services'


@dataclass(frozen=True, slots=True)
class Process:
    pid: int
    comm: str
    cmdline: str
    unit: str | None  # systemd unit from the cgroup path; None when not under systemd


@dataclass(slots=True)
class Listener:
    netns: str
    proto: str  # "tcp", "tcp6" or "unix"
    address: str  # "127.0.0.1:8080", "[::1]:443", a socket path or "@abstract"
    port: int | None  # None for unix sockets
    queue: int  # connections waiting for accept() now
    backlog: int  # effective backlog: min(listen() argument, somaxconn at that listen())
    drops: int | None  # SK_MEMINFO_DROPS: 1 per SYN-stage, 2 per ACK-stage overflow
    cookie: int
    inode: int
    uid: int | None
    processes: tuple[Process, ...] = ()

    @property
    def fill(self) -> float:
        # The kernel calls a queue full only when it holds backlog+1, so fill can exceed 1.0;
        # listen(0) still admits one connection, hence the floor of 1.
        return self.queue / max(self.backlog, 1)


@dataclass(slots=True)
class Namespace:
    name: str  # "host", a name under /run/netns, or "pid:N" for an unnamed namespace
    inode: int
    sysctls: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    listeners: int = 0
    skipped_messages: int = 0  # malformed netlink messages the decoder skipped
    error: str | None = None  # why this namespace could not be read, if it could not
    path: str = ""  # the file that opened it (/run/netns/NAME, /proc/PID/ns/net)
    # Figures of an earlier sweep: the budget did not reach it this time (its listeners are that
    # sweep's rows too), so the model keeps its history instead of forgetting it.
    stale: bool = False
    read_at: float = 0.0  # time.time() when it was read


@dataclass(slots=True)
class Snapshot:
    taken_at: float  # time.time() at the start of the sweep
    duration: float  # seconds the sweep took
    namespaces: list[Namespace]
    listeners: list[Listener]
    # What the daemon's budgets left out (aqtune/collect/sweep.py, Sweeper); a one-shot sweep reads all.
    partial: bool = False  # the time or namespace budget cut this sweep
    skipped_namespaces: int = 0  # due this sweep, left for the next one (their last rows stand in, stale)
    skipped_listeners: int = 0  # over the listener budget: not tracked this sweep (sampled round-robin)
    idle_namespaces: int = 0  # no listener at their last read: not read this sweep, revisited now and then


@dataclass(frozen=True, slots=True)
class ListenerEvents:
    """What eBPF saw happen to one listener since aqtune started watching it (counters), and
    between the last two sweeps (peak_queue)."""

    enqueued: int
    peak_queue: int | None  # the longest queue an arrival saw since the previous sweep
    ack_overflow: int  # handshake-completing ACKs dropped at a full queue
    syn_overflow: int | None  # SYNs dropped at a full queue; None where no probe can see them
    synack_retransmits: int
    accepts: int
    queue_wait_ms: dict[str, float] | None  # {"p50": ..., "p99": ...} of enqueue-to-accept time
    requested_backlog: int | None  # the backlog the application passed to listen(), if seen

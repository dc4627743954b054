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
# The sysctls aqtune may ever write (and rollback may restore): nothing else, whatever a ledger says.
TUNABLES = ("net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog")
COUNTERS = (
    "ListenOverflows",
    "ListenDrops",
    "TCPReqQFullDrop",
    "TCPReqQFullDoCookies",
    "SyncookiesSent",
    "SyncookiesFailed",
    "TCPSynRetrans",
)


@dataclass(frozen=True, slots=True)
class Process:
    pid: int
    comm: str  # what the process calls itself (prctl/exec); 15 bytes at most, any process can set it
    cmdline: str  # argv joined by spaces, truncated (see procfs.CMDLINE_MAX)
    # The host's system manager's unit from the cgroup path (a container's own unit where the process
    # runs under a container's manager, with ``container`` set); None when not under systemd and for
    # processes of a user manager (user@UID.service), whose units any user names as they like.
    unit: str | None
    exe: str = ""  # basename of /proc/PID/exe ("python3.11" for a Python server); "" where unreadable
    app: str = ""  # for interpreters (python, node, php, ...): the script or -m module from argv, else ""
    socket_activated: bool = False  # LISTEN_FDS set and LISTEN_PID == pid in its initial environment
    user_unit: str | None = None  # the unit of a user manager (user@UID.service) it runs in
    container: str | None = None  # the host unit of the container it runs in (machine-web.scope, docker-ID.scope)
    ppid: int = 0  # parent pid, to tell a server's workers (children of its master) from the master
    threads: int = 0  # threads of the process (0: unknown), to tell threaded from forking servers
    starttime: int = 0  # clock ticks after boot at which it started: (pid, starttime) names one process


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
    # SO_NETNS_COOKIE: with the inode, what tells this namespace from a later one reusing its inode;
    # None when unknown (kernel before 5.14).
    cookie: int | None = None
    # Owned by a user namespace other than the host's (rootless container, `unshare -rn`): its
    # creator (owner_uid) is root in there. Apply mode leaves such namespaces alone by default.
    user_owned: bool = False
    owner_uid: int | None = None


@dataclass(slots=True)
class Snapshot:
    taken_at: float  # time.time() at the start of the sweep
    duration: float  # seconds the sweep took
    namespaces: list[Namespace]
    listeners: list[Listener]


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
    # How long the oldest connection still queued has waited, from the arrival stamps: 0.0 when none
    # is queued, None where unknown (no eBPF, or it was queued before the probes came).
    oldest_queued_ms: float | None = None

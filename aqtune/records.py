"""Typed records of one observation sweep, and of what aqtune changed: what every later layer consumes.

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
SYSTEM_UID_MAX = 999  # Debian's SYS_UID_MAX: sockets of uids above it are people's, not services'


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
    # How long the oldest connection still queued has waited, from the arrival stamps: 0.0 when none
    # is queued, None where unknown (no eBPF, or it was queued before the probes came).
    oldest_queued_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Connection:
    """One connection of a listener, server side, as sock_diag shows it: accepted, or still queued.

    The peer and every figure are the kernel's; the holders are the processes with the socket open
    (the worker serving it), from a /proc fd scan made only when someone asks.
    """

    netns: str
    proto: str  # "tcp", "tcp6" or "unix"
    local: str  # "127.0.0.1:8080", "[::1]:443", a socket path or "@abstract"
    peer: str  # "127.0.0.1:51234"; for Unix, "inode N" of the client's socket (Unix peers have no address)
    state: str  # "established", or "close-wait" once the client has closed its side
    inode: int  # 0 while the connection still waits in the accept queue (no socket file yet)
    cookie: int
    uid: int | None
    # TCP only (None for Unix, which keeps no such times): seconds since data was last received and
    # last sent; the kernel starts both clocks at the handshake, so they never exceed the age.
    recv_idle: float | None = None
    send_idle: float | None = None
    bytes_in: int | None = None  # bytes received from the client (tcpi_bytes_received)
    bytes_out: int | None = None  # bytes sent and acknowledged by the client (tcpi_bytes_acked)
    rqueue: int = 0  # bytes received and not yet read by the server
    wqueue: int = 0  # bytes sent and not yet acknowledged (TCP), or not yet read by the peer (Unix)
    peer_inode: int = 0  # Unix: the client socket's inode
    accepted_at: float | None = None  # wall-clock time of its accept(), from eBPF; None where unseen
    holders: tuple[Process, ...] = ()

    @property
    def queued(self) -> bool:
        """Still in the accept queue: established by the kernel, not yet taken by accept()."""
        return self.inode == 0

    def age(self, now: float) -> float | None:
        """Seconds since accept(), where eBPF saw it."""
        return None if self.accepted_at is None else max(now - self.accepted_at, 0.0)

    @property
    def min_age(self) -> float | None:
        """What tcp_info proves about the age without eBPF: at least the longer of the two idle times."""
        known = [t for t in (self.recv_idle, self.send_idle) if t is not None]
        return max(known) if known else None


@dataclass(frozen=True, slots=True)
class ConnectionSummary:
    """A listener's connections at one moment: counts over all of them, and the longest-held few.

    A reuseport group's sockets cannot be told apart by their connections (sock_diag shows no link
    from an accepted socket to the listener that queued it), so each member's summary is the group's,
    with ``shared`` the number of members.
    """

    taken_at: float
    accepted: int  # accepted and open
    queued: int  # established, still waiting in the accept queue
    long_held: int  # accepted and open longer than long_after (by eBPF age, or proven by tcp_info)
    idle: int  # accepted, nothing received for idle_after seconds (TCP only)
    held: int  # accepted and long-held or idle (or both)
    answered: int  # of those long-held or idle: answered since the client last sent (idle keep-alive ones)
    held_by: tuple[int, ...]  # pids holding a long-held or idle connection
    busy: tuple[int, ...]  # pids holding any accepted connection
    oldest: float | None  # seconds: the longest-open accepted connection (eBPF age, else tcp_info's lower bound)
    oldest_queued: float | None  # seconds the longest-waiting queued connection has waited (TCP)
    ages: str  # where ages come from: "ebpf", or "none" (tcp_info's lower bounds only)
    long_after: float
    idle_after: float
    shared: int = 1  # listeners these connections are counted for (members of one reuseport group)
    top: tuple[Connection, ...] = ()  # worst first (long-held or idle, then longest open), at most those asked for
    more: int = 0  # connections left out of ``top``
    unread: int = 0  # connections beyond the bound on how many one look reads (collect.connections.MAX_ROWS)


@dataclass(frozen=True, slots=True)
class Managed:
    """What aqtune did to one sysctl in one namespace (from the change ledger)."""

    original: int  # the value before aqtune's first change
    applied: int  # the value aqtune last wrote
    changed_at: float
    earlier: tuple[int, ...] = ()  # values aqtune wrote before ``applied``, oldest first

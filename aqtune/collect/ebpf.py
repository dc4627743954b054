"""The eBPF event layer: compile bpf/aqtune.c once with bcc, attach what this kernel allows, say
exactly what it does not, and turn the maps into per-listener events keyed by socket inode.

Probes are chosen by what the running kernel has (tracepoint formats, BTF, kprobe support), then
proven by loading: feature probes mislead (bcc's support_kfunc() says yes on kernels that refuse
fentry with EPERM). Each capability has an ordered list of ways to get it; the first that attaches
wins and the others' failures are kept as the reason shown in status.
"""

from __future__ import annotations

import ctypes
import enum
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aqtune.collect.bpftables import EVENTS, SCALAR, BccTables, Tables
from aqtune.collect.btf import Btf, BtfError
from aqtune.records import ListenerEvents

SOURCE_DIRS = (Path(__file__).resolve().parents[2] / "bpf", Path("/usr/share/aqtune/bpf"))
TRACEFS = "/sys/kernel/tracing"
WAIT_BUCKETS = 32
EMIT_ALL = 1
EMIT_DROPS = 2
EVENT_KINDS = {1: "enqueue", 2: "ack-overflow", 3: "syn-overflow", 4: "synack-retrans", 5: "accept", 6: "listen"}
# The arrival stamps (struct stamp in bpf/aqtune.c): where connection number `seq` of a listener is.
STAMP_SLOTS = 1 << 17
STAMP_MULTIPLIER = 2654435761
U32 = 0xFFFFFFFF  # connection numbers are u32 and wrap
# The maps the layer reads, by their names in bpf/aqtune.c (the child hands these layouts over).
READ_MAPS = ("stats", "accepted", "peaks", "stamps", "accept_times")
# Accept times (accept_times in bpf/aqtune.c): slot = inode's low bits; the word holds a tag (the
# inode's next bits) over the time in units of 2^ACCEPT_TIME_SHIFT ns.
ACCEPT_SLOT_BITS = 19
ACCEPT_TAG_BITS = 14
ACCEPT_TIME_SHIFT = 10

# Name in the C source -> (BTF member path, the header expression used when there is no BTF).
OFFSETS = {
    "OFF_SKC_DADDR": ("sock.__sk_common.skc_daddr", "offsetof(struct sock_common, skc_daddr)"),
    "OFF_SKC_RCV_SADDR": ("sock.__sk_common.skc_rcv_saddr", "offsetof(struct sock_common, skc_rcv_saddr)"),
    "OFF_SKC_DPORT": ("sock.__sk_common.skc_dport", "offsetof(struct sock_common, skc_dport)"),
    "OFF_SKC_NUM": ("sock.__sk_common.skc_num", "offsetof(struct sock_common, skc_num)"),
    "OFF_SKC_FAMILY": ("sock.__sk_common.skc_family", "offsetof(struct sock_common, skc_family)"),
    "OFF_SKC_STATE": ("sock.__sk_common.skc_state", "offsetof(struct sock_common, skc_state)"),
    "OFF_SKC_NET": ("sock.__sk_common.skc_net", "offsetof(struct sock_common, skc_net)"),
    "OFF_SKC_V6_DADDR": ("sock.__sk_common.skc_v6_daddr", "offsetof(struct sock_common, skc_v6_daddr)"),
    "OFF_SKC_V6_RCV_SADDR": ("sock.__sk_common.skc_v6_rcv_saddr",
                             "offsetof(struct sock_common, skc_v6_rcv_saddr)"),
    "OFF_ACK_BACKLOG": ("sock.sk_ack_backlog", "offsetof(struct sock, sk_ack_backlog)"),
    "OFF_MAX_ACK_BACKLOG": ("sock.sk_max_ack_backlog", "offsetof(struct sock, sk_max_ack_backlog)"),
    "OFF_SK_SOCKET": ("sock.sk_socket", "offsetof(struct sock, sk_socket)"),
    "OFF_SK_RECEIVE_QUEUE_QLEN": ("sock.sk_receive_queue",
                                  "offsetof(struct sock, sk_receive_queue) + offsetof(struct sk_buff_head, qlen)"),
    "OFF_NET_INUM": ("net.ns.inum", "offsetof(struct net, ns.inum)"),
    "OFF_SOCKET_SK": ("socket.sk", "offsetof(struct socket, sk)"),
    "OFF_SOCKET_INODE": ("socket_alloc.vfs_inode",
                         "offsetof(struct socket_alloc, vfs_inode) + offsetof(struct inode, i_ino)"),
    "OFF_SKB_HEAD": ("sk_buff.head", "offsetof(struct sk_buff, head)"),
    "OFF_SKB_NETWORK_HEADER": ("sk_buff.network_header", "offsetof(struct sk_buff, network_header)"),
    "OFF_SKB_TRANSPORT_HEADER": ("sk_buff.transport_header", "offsetof(struct sk_buff, transport_header)"),
    "OFF_TASK_FILES": ("task_struct.files", "offsetof(struct task_struct, files)"),
    "OFF_FILES_FDT": ("files_struct.fdt", "offsetof(struct files_struct, fdt)"),
    "OFF_FDTABLE_FD": ("fdtable.fd", "offsetof(struct fdtable, fd)"),
    "OFF_FILE_PRIVATE_DATA": ("file.private_data", "offsetof(struct file, private_data)"),
}
# Where a syscall's first two arguments are in the registers saved on entry, by architecture. (Not
# arm64's x0: the return value overwrites it before the exit tracepoint.) Elsewhere, and on kernels
# without bpf_task_pt_regs (before 5.15), the syscalls' entry tracepoints keep them.
SYSCALL_ARG_OFFSETS = {
    "x86_64": {"OFF_SYSCALL_ARG0": ("pt_regs.di", "offsetof(struct pt_regs, di)"),
               "OFF_SYSCALL_ARG1": ("pt_regs.si", "offsetof(struct pt_regs, si)")},
}
# Members whose offset is the sum of two paths.
OFFSET_ADDENDS = {"OFF_SK_RECEIVE_QUEUE_QLEN": "sk_buff_head.qlen", "OFF_SOCKET_INODE": "inode.i_ino"}
HEADER_INCLUDES = ("net/sock.h", "linux/net.h", "linux/fs.h", "linux/fdtable.h", "linux/sched.h",
                   "net/net_namespace.h", "linux/skbuff.h")


class Unavailable(Exception):
    """eBPF cannot run here; the message says why and what would fix it."""


@dataclass(frozen=True, slots=True)
class KernelFeatures:
    tracepoints: frozenset[str]  # "category:name" present in tracefs
    kfree_skb_has_rx_sk: bool
    listen_overflow_reason: int | None  # SKB_DROP_REASON_TCP_LISTEN_OVERFLOW, from BTF
    kprobes: bool
    btf: bool
    machine: str  # os.uname().machine
    task_pt_regs: bool  # the kernel's BTF knows the bpf_task_pt_regs() helper (5.15+)


class How(enum.Enum):
    """The mechanism that attached a probe; the value is the word status shows."""

    RAW_TRACEPOINT = "raw tracepoint"
    TRACEPOINT = "tracepoint"
    FENTRY = "fentry"
    KPROBE = "kprobe"


@dataclass(frozen=True, slots=True)
class ProbeState:
    """One attach point: attached ``how`` (with an optional ``note``), or not attached and ``why_not``.

    ``text`` is the wording status, the journal and trace show: "attached (how[; note])" or
    "not attached: why"."""

    how: How | None = None
    note: str | None = None  # attached: what else to know (entry probes kept arguments, why not fentry)
    why_not: str | None = None  # not attached: the reason, what was tried

    @classmethod
    def by(cls, how: How, note: str | None = None) -> ProbeState:
        return cls(how=how, note=note)

    @classmethod
    def failed(cls, why_not: str) -> ProbeState:
        return cls(why_not=why_not)

    @property
    def attached(self) -> bool:
        return self.how is not None

    @property
    def text(self) -> str:
        if self.how is None:
            return f"not attached: {self.why_not}"
        return f"attached ({self.how.value}; {self.note})" if self.note else f"attached ({self.how.value})"

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Way:
    """One way to get a capability: a tracepoint, or a kernel function via fentry then kprobe."""

    kind: str  # "raw_tracepoint", "tracepoint" or "function"
    target: str  # tracepoint "category:name", or kernel function names joined by "+"
    program: str  # the C function (kprobe variant for functions)
    fentry_define: str | None = None  # compile flag for the fentry variant
    reads_syscall_args: bool = False  # from the saved registers, or kept by the entry tracepoints


CAPABILITIES: dict[str, tuple[Way, ...]] = {
    "enqueue": (Way("raw_tracepoint", "sock:sk_data_ready", "on_sk_data_ready"),
                Way("function", "inet_csk_complete_hashdance", "on_complete_hashdance",
                    "FENTRY_COMPLETE_HASHDANCE")),
    "ack_overflow": (Way("raw_tracepoint", "skb:kfree_skb", "on_kfree_skb"),
                     Way("function", "tcp_v4_syn_recv_sock+tcp_v6_syn_recv_sock", "on_syn_recv_sock",
                         "FENTRY_SYN_RECV_SOCK")),
    "syn_overflow": (Way("function", "tcp_conn_request", "on_conn_request", "FENTRY_CONN_REQUEST"),),
    "synack_retransmits": (Way("raw_tracepoint", "tcp:tcp_retransmit_synack", "on_retransmit_synack"),),
    "accept": (Way("tracepoint", "syscalls:sys_exit_accept4+syscalls:sys_exit_accept", "on_accept_exit",
                   reads_syscall_args=True),),
    "listen": (Way("tracepoint", "syscalls:sys_exit_listen", "on_listen_exit", reads_syscall_args=True),),
}


def ensure_tracefs() -> None:
    """bcc needs tracefs; systemd mounts it on a normal host, a minimal container may not have."""
    if os.path.isdir(f"{TRACEFS}/events"):
        return
    # An absolute path: root must not run whatever `mount` comes first in an inherited $PATH.
    # /bin/mount is util-linux's on Debian with and without merged /usr.
    result = subprocess.run(["/bin/mount", "-t", "tracefs", "nodev", TRACEFS], capture_output=True, text=True)
    if result.returncode != 0:
        raise Unavailable(f"tracefs is not mounted at {TRACEFS} and mounting it failed: {result.stderr.strip()}")


def detect(btf: Btf | None) -> KernelFeatures:
    events = Path(TRACEFS) / "events"
    present = set()
    for category in ("sock", "skb", "tcp", "syscalls"):
        try:
            present |= {f"{category}:{entry.name}" for entry in os.scandir(events / category) if entry.is_dir()}
        except OSError:
            continue
    try:
        rx_sk = "rx_sk" in (events / "skb" / "kfree_skb" / "format").read_text()
    except OSError:
        rx_sk = False
    reason = None
    if btf is not None:
        try:
            reason = btf.enum_value("skb_drop_reason", "SKB_DROP_REASON_TCP_LISTEN_OVERFLOW")
        except BtfError:
            reason = None
    kprobes = os.path.exists(f"{TRACEFS}/kprobe_events")
    task_pt_regs = False
    if btf is not None:
        try:
            task_pt_regs = btf.enum_value("bpf_func_id", "BPF_FUNC_task_pt_regs") > 0
        except BtfError:
            task_pt_regs = False
    return KernelFeatures(frozenset(present), rx_sk, reason, kprobes, btf is not None, os.uname().machine,
                          task_pt_regs)


def registers_readable(features: KernelFeatures) -> bool:
    """Whether syscall arguments can be read at the exit tracepoints (else entry probes keep them)."""
    return features.task_pt_regs and features.machine in SYSCALL_ARG_OFFSETS


def entry_of(exit_tracepoint: str) -> str:
    return exit_tracepoint.replace(":sys_exit_", ":sys_enter_")


def usable(way: Way, features: KernelFeatures) -> str | None:
    """Why ``way`` cannot work on this kernel, or None when it may (loading proves it)."""
    if way.kind in ("raw_tracepoint", "tracepoint"):
        needed = way.target.split("+")
        if way.reads_syscall_args and not registers_readable(features):
            needed += [entry_of(tp) for tp in needed]
        missing = [tp for tp in needed if tp not in features.tracepoints]
        if missing:
            return f"no tracepoint {', '.join(missing)}"
        if way.target == "skb:kfree_skb" and not (features.kfree_skb_has_rx_sk and features.listen_overflow_reason):
            return "kfree_skb has no rx_sk or no TCP_LISTEN_OVERFLOW reason on this kernel"
        return None
    if not features.kprobes and not features.btf:
        return "kprobes absent and no BTF for fentry"
    return None


def choose(features: KernelFeatures) -> dict[str, Way | str]:
    """For each capability the first way this kernel may support, or why none can."""
    chosen: dict[str, Way | str] = {}
    for capability, ways in CAPABILITIES.items():
        reasons = []
        for way in ways:
            why_not = usable(way, features)
            if why_not is None:
                chosen[capability] = way
                break
            reasons.append(f"{way.target}: {why_not}")
        else:
            chosen[capability] = "; ".join(reasons)
    return chosen


def compile_flags(btf: Btf | None, features: KernelFeatures, fentry: set[str], emit: int = 0,
                  netns_inode: int = 0) -> list[str]:
    """The -D constants bpf/aqtune.c is compiled with: offsets, enum values, which fentry variants to
    build, and which events go out (``emit``, EMIT_* flags) from which namespace (0: all)."""
    flags = [f"-DEMIT_FLAGS={emit}", f"-DONLY_NETNS={netns_inode}u"]
    registers = SYSCALL_ARG_OFFSETS[features.machine] if registers_readable(features) else {}
    for name, (path, expression) in (OFFSETS | registers).items():
        if btf is not None:
            value = btf.offset(path) + (btf.offset(OFFSET_ADDENDS[name]) if name in OFFSET_ADDENDS else 0)
            flags.append(f"-D{name}={value}")
        else:
            flags.append(f"-D{name}=({expression})")
    if features.listen_overflow_reason is not None:
        flags.append(f"-DREASON_LISTEN_OVERFLOW={features.listen_overflow_reason}")
    flags += [f"-D{define}" for define in sorted(fentry)]
    return flags


def source_text(btf: Btf | None) -> str:
    for directory in SOURCE_DIRS:
        path = directory / "aqtune.c"
        if path.is_file():
            text = path.read_text()
            if btf is None:
                # Without BTF the offsets come from the headers bcc compiles against: right only
                # when they match the running kernel, which status then says it cannot check.
                text = "".join(f"#include <{h}>\n" for h in HEADER_INCLUDES) + text
            return text
    raise Unavailable(f"aqtune.c not found in {' or '.join(str(d) for d in SOURCE_DIRS)}")


def stamp_index(inode: int, seq: int) -> int:
    """The stamps slot of connection ``seq`` of listener ``inode``, as stamp_slot() computes it."""
    return ((inode & U32) * STAMP_MULTIPLIER + seq) & (STAMP_SLOTS - 1)


def stamp_tag(inode: int, seq: int) -> int:
    return (inode << 32 | seq) & 0xFFFFFFFFFFFFFFFF


def accept_time_slot(inode: int) -> int:
    return inode & ((1 << ACCEPT_SLOT_BITS) - 1)


def accept_time_ns(inode: int, word: int) -> int | None:
    """The CLOCK_MONOTONIC ns (to 1.024 us) at which socket ``inode`` was accepted, from its slot's
    word; None when the slot holds another socket's time or none."""
    time_bits = 64 - ACCEPT_TAG_BITS
    units = word & ((1 << time_bits) - 1)
    if not units or word >> time_bits != (inode >> ACCEPT_SLOT_BITS) & ((1 << ACCEPT_TAG_BITS) - 1):
        return None
    return units << ACCEPT_TIME_SHIFT


def oldest_queued(seq_base: int, enqueued: int, accepts: int, next_seq: int,
                  queue: int | None) -> tuple[int, int] | None:
    """(the number of the oldest connection still queued, how many are queued), or None when that
    cannot be known. Connections are numbered seq_base + 1, + 2, ... as they are queued (u32, wrapping).

    With ``queue``, the queue's length now (sock_diag), the queued ones are the last ``queue``
    numbered: right even when accepts went unseen (io_uring). Without it, the oldest is the one the
    next accept() takes (``next_seq``), or the first numbered when no accept() was seen at all."""
    last = (seq_base + enqueued) & U32
    if queue is not None:
        return (last - queue + 1) & U32, queue
    if not accepts:
        return (seq_base + 1) & U32, enqueued
    if not next_seq:  # accepts counted, but none could be placed in the numbering
        return None
    count = (last - next_seq + 1) & U32
    # An accept() that ran ahead of its enqueue's probe: nothing queued.
    return next_seq, 0 if count > 2**31 else count


def percentile(histogram: list[int], fraction: float) -> float:
    """Upper bound in ms of the log2(us) bucket holding the ``fraction`` quantile (of a non-empty one)."""
    rank = fraction * sum(histogram)
    seen = 0
    for bucket, count in enumerate(histogram):
        seen += count
        if seen >= rank:
            return float(2 ** (bucket + 1)) / 1000.0
    return float(2 ** len(histogram)) / 1000.0


@dataclass(frozen=True, slots=True)
class Event:
    ts_ns: int
    kind: str
    netns: int
    inode: int
    family: int
    local: str
    port: int
    peer: str | None
    peer_port: int
    queue: int
    backlog: int
    value: int
    pid: int
    comm: str


def decode_event(raw: Mapping[str, Any]) -> Event:
    """An Event from ``struct event``'s fields as its Layout decodes them (bpftables.Layout.decode):
    integers, ``local``/``peer`` as 16 bytes, ``comm`` as bytes up to its NUL."""
    family = int(raw["family"])
    af = socket.AF_INET6 if family == socket.AF_INET6 else socket.AF_INET
    size = 16 if af == socket.AF_INET6 else 4
    local, peer = bytes(raw["local"])[:size], bytes(raw["peer"])[:size]
    comm = bytes(raw["comm"]).split(b"\0", 1)[0].decode(errors="replace")  # any bytes a process names itself
    kind = int(raw["kind"])
    return Event(int(raw["ts"]), EVENT_KINDS.get(kind, str(kind)), int(raw["netns"]), int(raw["inode"]), family,
                 socket.inet_ntop(af, local), int(raw["port"]), socket.inet_ntop(af, peer) if any(peer) else None,
                 int(raw["peer_port"]), int(raw["queue"]), int(raw["backlog"]), int(raw["value"]), int(raw["pid"]),
                 comm)


def perf_pages(emit: int, pages: int | None) -> int:
    """Pages per CPU of the perf buffer: every event (trace) needs room for bursts; drops alone are few."""
    return pages or (256 if emit & EMIT_ALL else 64)


@dataclass(slots=True)
class EventLayer:
    """The loaded probes and their maps. ``tables`` reaches the maps and perf buffer: through bcc when
    compiled here (start()), through descriptors when a child compiled it (start_in_child())."""

    tables: Tables
    probes: dict[str, ProbeState]  # attach point -> how it attached, or why not
    mode: str
    syn_overflow_seen: bool
    offsets_from: str  # "BTF" or "kernel headers"
    lost: int = 0
    _handlers: list[Callable[[Event], None]] = field(default_factory=list)
    _unseen: set[int] = field(default_factory=set)  # inodes with entries that the last sweep lacked
    # The stats and accepted entries the last read found, by inode: what forget_closed may delete.
    _read_raw: tuple[Mapping[int, bytes], Mapping[int, bytes]] = ({}, {})
    # The last read's result per inode, with the raw values it came from: a listener whose map values
    # did not move and whose queue is empty reads the same (most of a thousand quiet listeners).
    _kept: dict[int, tuple[tuple[bytes | None, bytes | None, int | None, int | None], ListenerEvents]] = field(
        default_factory=dict)
    # The last read whole: both maps' raw entries and its result, kept when every queue was empty. Maps
    # read the same, no peak and still every queue empty, the result is the same, and is not worked out
    # again listener by listener.
    _quiet: tuple[dict[int, bytes], dict[int, bytes], dict[int, ListenerEvents]] | None = None
    # What attached each probe, for resume(): attach point -> (way, kernel features, fentry refusals).
    _reattach: dict[str, tuple[Way, KernelFeatures, dict[str, str]]] = field(default_factory=dict)

    @classmethod
    def start(cls, emit: int = 0, netns_inode: int = 0, pages: int | None = None) -> EventLayer:
        """Compile and attach; raises Unavailable (with the reason) when eBPF cannot run at all.

        ``emit`` chooses the events sent to userspace (EMIT_*); ``netns_inode`` keeps only one
        namespace's, filtered in the kernel. Both are compiled in: another choice takes another
        layer. ``pages`` sizes the perf buffer per CPU (a power of two; default by ``emit``).
        Use it as a context manager, or call close().
        """
        ensure_tracefs()
        try:
            from bcc import BPF
        except ImportError:
            raise Unavailable("bcc is not installed (Debian package python3-bpfcc)") from None
        build = Path(f"/lib/modules/{os.uname().release}/build")
        if not build.exists():
            raise Unavailable(f"no kernel headers at {build}: install linux-headers-{os.uname().release} "
                              "(bcc compiles against them)")
        try:
            btf: Btf | None = Btf.load()
        except BtfError:
            btf = None
        features = detect(btf)
        chosen = choose(features)
        fentry = {way.fentry_define for way in chosen.values()
                  if isinstance(way, Way) and way.fentry_define and features.btf}
        fentry.discard(None)
        refused: dict[str, str] = {}

        class Loader(BPF):  # type: ignore[misc]
            """bcc attaches fentry programs while compiling; a refusal must not abort the rest."""

            def attach_kfunc(self, fn_name: bytes = b"") -> Any:
                try:
                    return super().attach_kfunc(fn_name=fn_name)
                except Exception as exc:  # bcc raises bare Exception
                    name = fn_name.decode().removeprefix("kfunc__").removeprefix("vmlinux__")
                    refused[name] = _errno_text(exc)
                    return self

        # libbcc prints compiler and verifier output on fd 2; it is kept for a failure's message, and
        # an expected refusal (fentry here) already shows in the probe states.
        with tempfile.TemporaryFile() as captured:
            saved = os.dup(2)
            os.dup2(captured.fileno(), 2)
            try:
                bpf = Loader(text=source_text(btf),
                             cflags=compile_flags(btf, features, {f for f in fentry if f}, emit, netns_inode))
            except Exception as exc:  # bcc's compile and load errors too
                captured.seek(0)
                details = captured.read().decode(errors="replace").strip().splitlines()[-5:]
                said = f"{exc} {' '.join(details)}"
                if "Operation not permitted" in said or "super-user" in said:
                    raise Unavailable("BPF refused (EPERM): aqtune needs CAP_BPF and CAP_PERFMON (or "
                                      "CAP_SYS_ADMIN), and no seccomp filter on bpf()"
                                      + (f"; bcc said: {details[-1]}" if details else "")) from None
                raise Unavailable(f"bcc could not compile or load bpf/aqtune.c: {exc}"
                                  + (": " + " | ".join(details) if details else "")) from None
            finally:
                os.dup2(saved, 2)
                os.close(saved)
        probes: dict[str, ProbeState] = {}
        for capability, way in chosen.items():
            if isinstance(way, str):
                probes[capability] = ProbeState.failed(way)
                continue
            for target in way.target.split("+"):
                probes[target] = _attach(bpf, way, target, features, refused)
        syn_seen = "tcp_conn_request" in probes and probes["tcp_conn_request"].attached
        try:
            tables = BccTables(bpf, READ_MAPS)
        except Exception as exc:  # bcc's errors, a struct the layouts cannot decode (ValueError)
            bpf.cleanup()
            raise Unavailable(f"cannot read the maps of bpf/aqtune.c: {exc}") from None
        layer = cls(tables, probes, describe_mode(probes, syn_seen), syn_seen, "BTF" if btf else "kernel headers")
        layer._reattach = {target: (way, features, refused) for way in chosen.values() if isinstance(way, Way)
                           for target in way.target.split("+") if probes[target].attached}
        if emit:
            try:
                tables.open_events(perf_pages(emit, pages))
            except Exception as exc:  # bcc raises bare Exception when perf_event_open is refused
                bpf.cleanup()
                raise Unavailable(f"cannot open the perf buffer ({exc}): perf_event_open refused "
                                  "(CAP_PERFMON, a seccomp filter or perf_event_paranoid)") from None
        return layer

    @classmethod
    def start_in_child(cls, emit: int = 0, netns_inode: int = 0, pages: int | None = None) -> EventLayer:
        """As start(), compiled and attached by a short-lived child process that hands the programs,
        attachments, maps and perf buffer over as descriptors and exits: this process never imports
        bcc nor maps LLVM (about 90 MiB resident otherwise). The daemon's way. Where Python cannot
        read a perf ring safely (see bpftables.ORDERED_MACHINES) it is start() itself."""
        from aqtune.collect import ebpf_child

        if not ebpf_child.supported():
            return cls.start(emit=emit, netns_inode=netns_inode, pages=pages)
        handed = ebpf_child.compile_in_child(emit, netns_inode, perf_pages(emit, pages) if emit else 0)
        return cls(handed.tables, handed.probes, handed.mode, handed.syn_overflow_seen, handed.offsets_from)

    @property
    def bpf(self) -> Any:
        """bcc's BPF object, for what only bcc can do (pause/resume, the benchmarks); RuntimeError when
        the layer was handed over by a child."""
        if not isinstance(self.tables, BccTables):
            raise RuntimeError("this event layer was compiled in a child (start_in_child): there is no bcc "
                               "object here; use EventLayer.start() for what needs one")
        return self.tables.bpf

    def __enter__(self) -> EventLayer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _dispatch(self, data: bytes) -> None:
        event = decode_event(self.tables.layouts[EVENTS].decode(data))
        for handler in self._handlers:
            handler(event)

    def _count_lost(self, lost: int) -> None:
        self.lost += lost

    def on_event(self, handler: Callable[[Event], None]) -> None:
        self._handlers.append(handler)

    def poll(self, timeout_ms: int) -> None:
        """Deliver pending events to the handlers; returns after ``timeout_ms`` at most."""
        self.tables.poll(timeout_ms, self._dispatch, self._count_lost)

    def read(self, queues: Mapping[int, int] | None = None) -> dict[int, ListenerEvents]:
        """Per-listener events by socket inode; drains the peak-queue map (peaks since last read).

        ``queues`` (socket inode -> queue length, from the sweep just made) lets the age of the
        oldest queued connection be found whether or not every accept was seen; without it, that
        age trusts the accepts the probes saw (see oldest_queued())."""
        now_ns = time.monotonic_ns()  # bpf_ktime_get_ns()'s clock
        layouts = self.tables.layouts
        peaks = {key: layouts["peaks"].decode(value)[SCALAR] for key, value in self.tables.drain("peaks")}
        raw_stats, raw_taken = dict(self.tables.entries("stats")), dict(self.tables.entries("accepted"))
        self._read_raw = (raw_stats, raw_taken)
        quiet = self._quiet
        if (quiet is not None and not peaks and quiet[0] == raw_stats and quiet[1] == raw_taken
                and queues is not None and all(queues.get(inode) == 0 for inode in quiet[2])):
            return dict(quiet[2])
        no_stats, none_taken = layouts["stats"].zero(), layouts["accepted"].zero()
        result: dict[int, ListenerEvents] = {}
        kept: dict[int, tuple[tuple[bytes | None, bytes | None, int | None, int | None], ListenerEvents]] = {}
        # A listener whose connections were all queued before the probes came has accepts alone. With
        # ``queues``, only the listeners the sweep found: after a churn, thousands of closed listeners'
        # entries wait two sweeps for forget_closed, and decoding them each read was most of a sweep.
        wanted = raw_stats.keys() | raw_taken.keys()
        for inode in wanted if queues is None else wanted & queues.keys():
            queue = None if queues is None else queues.get(inode)
            source = (raw_stats.get(inode), raw_taken.get(inode), peaks.get(inode), queue)
            before = self._kept.get(inode)
            if before is not None and before[0] == source and queue == 0:
                # Nothing moved and nothing waits: the oldest queued age (the only figure that
                # depends on the time) is 0 whenever it is read.
                result[inode] = before[1]
                kept[inode] = before
                continue
            stats = layouts["stats"].decode(source[0]) if source[0] is not None else no_stats
            taken = layouts["accepted"].decode(source[1]) if source[1] is not None else none_taken
            histogram = list(taken["wait_log2_us"])
            requested = stats["requested_backlog"]
            waits = None
            if any(histogram):
                waits = {"p50": percentile(histogram, 0.5), "p99": percentile(histogram, 0.99)}
            result[inode] = ListenerEvents(
                enqueued=stats["enqueued"], peak_queue=peaks.get(inode), ack_overflow=stats["ack_overflow"],
                syn_overflow=stats["syn_overflow"] if self.syn_overflow_seen else None,
                synack_retransmits=stats["synack_retrans"], accepts=taken["accepts"], queue_wait_ms=waits,
                # listen(fd, -1) in C asks for the maximum: the kernel caps it at somaxconn.
                requested_backlog=(2**31 - 1 if requested >= 2**31 else requested) or None,
                oldest_queued_ms=self._oldest_queued_ms(inode, stats if source[0] is not None else None, taken,
                                                        queue, now_ns),
            )
            kept[inode] = (source, result[inode])
        self._kept = kept
        empty = queues is not None and all(queues.get(inode) == 0 for inode in result)
        self._quiet = (raw_stats, raw_taken, dict(result)) if empty else None
        return result

    def _oldest_queued_ms(self, inode: int, stats: Mapping[str, Any] | None, taken: Mapping[str, Any],
                          queue: int | None, now_ns: int) -> float | None:
        """How long the oldest connection still queued has waited at ``now_ns``: 0.0 when none is,
        None when unknown (queued before aqtune's probes came, or its stamp was overwritten)."""
        if stats is None:  # nothing seen entering this listener's queue
            return 0.0 if queue == 0 else None
        found = oldest_queued(stats["seq_base"], stats["enqueued"], taken["accepts"], taken["next_seq"], queue)
        if found is None:
            return None
        seq, count = found
        if count == 0:
            return 0.0
        raw = self.tables.lookup("stamps", stamp_index(inode, seq))
        if raw is None:
            return None
        stamp = self.tables.layouts["stamps"].decode(raw)
        if int(stamp["tag"]) != stamp_tag(inode, seq):
            return None
        return max(now_ns - int(stamp["ts"]), 0) / 1e6

    def accepted_at(self, inodes: Iterable[int]) -> dict[int, float]:
        """When each of these accepted sockets (by socket inode, as sock_diag reports established
        ones) was accepted, in wall-clock seconds (time.time()'s scale, to about a microsecond),
        for those the probes saw accepted and whose slot no newer socket took (see accept_times in
        bpf/aqtune.c). Sockets accepted before aqtune started or through io_uring are left out."""
        layout = self.tables.layouts["accept_times"]
        wall_minus_monotonic = time.time() - time.monotonic()
        found = {}
        for inode in inodes:
            raw = self.tables.lookup("accept_times", accept_time_slot(inode))
            if raw is None:
                continue
            at_ns = accept_time_ns(inode, int(layout.decode(raw)[SCALAR]))
            if at_ns is not None:
                found[inode] = at_ns / 1e9 + wall_minus_monotonic
        return found

    def forget_closed(self, live: set[int]) -> None:
        """Drop the entries of listeners that two sweeps in a row did not find (closed, or in a
        namespace nobody watches): the entries are those the last read() found, ``live`` the inodes the
        sweep found. One sweep is not proof: a listener opened after the sweep read its namespace may
        have entries already. Nothing in the kernel does this: seeing a listener close takes a probe
        on every socket's state changes, six calls on every connection's path for a rare event, and
        the maps are LRU, so at worst what is left behind is evicted, never leaked."""
        stats, taken = self._read_raw
        unseen = (stats.keys() | taken.keys()) - live
        gone = unseen & self._unseen
        if gone:
            # Only from the map the last read found each in (a listener that never accepted has no
            # accepted entry), and never from peaks: read() drains that map every time.
            for name, found in (("stats", stats), ("accepted", taken)):
                self.tables.delete_many(name, sorted(inode for inode in gone if inode in found))
        self._unseen = unseen

    def pause(self) -> list[str]:
        """Detach the probes, keeping programs and maps; resume() attaches them again.

        For bench/probe_overhead.py only (the daemon and trace never call it): it alternates rounds
        with and without the probes a moment apart instead of a compile (about half a second) apart,
        so that drift in the machine's load falls on both alike. It lives here because only the
        layer knows how each probe was attached. While paused nothing is counted, so read() then
        lags the kernel. Returns the probes that stay: bcc attaches fentry programs as it loads them."""
        bpf = self.bpf  # RuntimeError when compiled in a child: there is nothing to attach with here
        staying = []
        for target, (way, features, _) in self._reattach.items():
            how = self.probes[target].how
            if how is How.RAW_TRACEPOINT:
                bpf.detach_raw_tracepoint(tp=target.split(":")[1])
            elif how is How.TRACEPOINT:
                bpf.detach_tracepoint(tp=target)
                if entry_probe_needed(way, features):
                    bpf.detach_tracepoint(tp=entry_of(target))
            elif how is How.KPROBE:
                bpf.detach_kprobe(event=target)
            else:
                staying.append(target)
        return staying

    def resume(self) -> None:
        """Attach again what pause() detached (the benchmark's; see pause())."""
        bpf = self.bpf
        for target, (way, features, refused) in self._reattach.items():
            if self.probes[target].how is not How.FENTRY:
                state = _attach(bpf, way, target, features, refused)
                if state != self.probes[target]:
                    raise RuntimeError(f"{target} {state} again (was {self.probes[target]})")

    def status(self) -> dict[str, Any]:
        return {"active": True, "probes": {probe: state.text for probe, state in self.probes.items()},
                "mode": self.mode, "offsets": self.offsets_from,
                "lost_events": self.lost}

    def close(self) -> None:
        self.tables.close()


def _errno_text(exc: Exception) -> str:
    text = str(exc)
    errno_value = ctypes.get_errno()
    # bcc words EPERM from BPF_PROG_LOAD as "Need super-user privileges", even for root.
    if "Operation not permitted" in text or "super-user" in text or errno_value == 1:
        return "fentry refused (EPERM)"
    if "524" in text or errno_value == 524:
        return "fentry not supported for this function (ENOTSUPP)"
    return f"fentry failed: {text.splitlines()[0] if text else type(exc).__name__}"


def entry_probe_needed(way: Way, features: KernelFeatures) -> bool:
    """Whether ``way`` reads syscall arguments that only its entry tracepoint can keep here."""
    return way.reads_syscall_args and not registers_readable(features)


def _attach(bpf: Any, way: Way, target: str, features: KernelFeatures, refused: dict[str, str]) -> ProbeState:
    try:
        if way.kind == "raw_tracepoint":
            bpf.attach_raw_tracepoint(tp=target.split(":")[1], fn_name=way.program)
            return ProbeState.by(How.RAW_TRACEPOINT)
        if way.kind == "tracepoint":
            kept = entry_probe_needed(way, features)
            if kept:
                bpf.attach_tracepoint(tp=entry_of(target), fn_name="on_syscall_enter")
            bpf.attach_tracepoint(tp=target, fn_name=way.program)
            return ProbeState.by(How.TRACEPOINT, f"arguments kept by {entry_of(target)}" if kept else None)
        if way.fentry_define and features.btf and target not in refused:
            return ProbeState.by(How.FENTRY)
        why_fentry = refused.get(target, "fentry not tried (no BTF)")
        if not features.kprobes:
            return ProbeState.failed(f"{why_fentry}; kprobes absent (no {TRACEFS}/kprobe_events)")
        bpf.attach_kprobe(event=target, fn_name=way.program)
        return ProbeState.by(How.KPROBE, why_fentry)
    except Exception as exc:  # bcc raises bare Exception
        return ProbeState.failed(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def describe_mode(probes: dict[str, ProbeState], syn_seen: bool) -> str:
    missing = sorted(name for name, state in probes.items() if not state.attached)
    text = "full" if not missing else "partial: " + ", ".join(missing) + " not observed"
    if not syn_seen:
        text += "; SYN-stage drops are counted only from the sweep (socket drops, ListenOverflows)"
    # accept() through io_uring (IORING_OP_ACCEPT) makes no accept syscall for the tracepoints to see.
    return text + "; queue wait covers accept()/accept4(), not io_uring accepts"


def unavailable_status(reason: str) -> dict[str, Any]:
    return {"active": False, "probes": {}, "mode": reason}

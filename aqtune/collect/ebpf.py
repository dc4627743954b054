"""The eBPF event layer: compile bpf/aqtune.c once with bcc, attach what this kernel allows, say
exactly what it does not, and turn the maps into per-listener events keyed by socket inode.

Probes are chosen by what the running kernel has (tracepoint formats, BTF, kprobe support), then
proven by loading: feature probes mislead (bcc's support_kfunc() says yes on kernels that refuse
fentry with EPERM). Each capability has an ordered list of ways to get it; the first that attaches
wins and the others' failures are kept as the reason shown in status.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aqtune.collect.btf import Btf, BtfError
from aqtune.records import ListenerEvents

SOURCE_DIRS = (Path(__file__).resolve().parents[2] / "bpf", Path("/usr/share/aqtune/bpf"))
TRACEFS = "/sys/kernel/tracing"
WAIT_BUCKETS = 32
EMIT_ALL = 1
EMIT_DROPS = 2
EVENT_KINDS = {1: "enqueue", 2: "ack-overflow", 3: "syn-overflow", 4: "synack-retrans", 5: "accept", 6: "listen"}

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


def compile_flags(btf: Btf | None, features: KernelFeatures, fentry: set[str]) -> list[str]:
    flags = []
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


EVENT = struct.Struct("=QQQIIIIIHHHH16s16s16s")


def decode_event(data: bytes) -> Event:
    (ts, inode, value, kind, netns, queue, backlog, pid, port, peer_port, family, _pad, local, peer,
     comm) = EVENT.unpack_from(data)
    af = socket.AF_INET6 if family == socket.AF_INET6 else socket.AF_INET
    size = 16 if af == socket.AF_INET6 else 4
    peer_text = socket.inet_ntop(af, peer[:size]) if any(peer) else None
    name = comm.split(b"\0", 1)[0].decode(errors="replace")
    return Event(ts, EVENT_KINDS.get(kind, str(kind)), netns, inode, family, socket.inet_ntop(af, local[:size]),
                 port, peer_text, peer_port, queue, backlog, value, pid, name)


@dataclass(slots=True)
class EventLayer:
    bpf: Any
    probes: dict[str, str]  # attach point -> "attached (how)" or why not
    mode: str
    syn_overflow_seen: bool
    offsets_from: str  # "BTF" or "kernel headers"
    lost: int = 0
    _handlers: list[Callable[[Event], None]] = field(default_factory=list)
    _unseen: set[int] = field(default_factory=set)  # inodes with entries that the last sweep lacked
    # What attached each probe, for resume(): attach point -> (way, kernel features, fentry refusals).
    _reattach: dict[str, tuple[Way, KernelFeatures, dict[str, str]]] = field(default_factory=dict)

    @classmethod
    def start(cls, emit: int = 0, netns_inode: int = 0) -> EventLayer:
        """Compile and attach; raises Unavailable (with the reason) when eBPF cannot run at all.

        ``emit`` chooses the events sent to userspace (EMIT_*); ``netns_inode`` keeps only one
        namespace's, filtered in the kernel.
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
                bpf = Loader(text=source_text(btf), cflags=compile_flags(btf, features, {f for f in fentry if f}))
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
        probes: dict[str, str] = {}
        for capability, way in chosen.items():
            if isinstance(way, str):
                probes[capability] = f"not attached: {way}"
                continue
            for target in way.target.split("+"):
                probes[target] = _attach(bpf, way, target, features, refused)
        syn_seen = probes.get("tcp_conn_request", "").startswith("attached")
        layer = cls(bpf, probes, describe_mode(probes, syn_seen), syn_seen, "BTF" if btf else "kernel headers")
        layer._reattach = {target: (way, features, refused) for way in chosen.values() if isinstance(way, Way)
                           for target in way.target.split("+") if probes[target].startswith("attached")}
        bpf["config"][ctypes.c_int(0)] = ctypes.c_uint32(emit)
        bpf["config"][ctypes.c_int(1)] = ctypes.c_uint32(netns_inode)
        if emit:
            try:
                # Every event (trace) needs room for bursts; drops alone are few.
                pages = 256 if emit & EMIT_ALL else 64
                bpf["events"].open_perf_buffer(layer._dispatch, page_cnt=pages, lost_cb=layer._count_lost)
            except Exception as exc:  # bcc raises bare Exception when perf_event_open is refused
                bpf.cleanup()
                raise Unavailable(f"cannot open the perf buffer ({exc}): perf_event_open refused "
                                  "(CAP_PERFMON, a seccomp filter or perf_event_paranoid)") from None
        return layer

    def _dispatch(self, _cpu: int, data: Any, size: int) -> None:
        event = decode_event(ctypes.string_at(data, size))
        for handler in self._handlers:
            handler(event)

    def _count_lost(self, lost: int) -> None:
        self.lost += lost

    def on_event(self, handler: Callable[[Event], None]) -> None:
        self._handlers.append(handler)

    def poll(self, timeout_ms: int) -> None:
        """Deliver pending events to the handlers; returns after ``timeout_ms`` at most."""
        self.bpf.perf_buffer_poll(timeout=timeout_ms)

    def read(self) -> dict[int, ListenerEvents]:
        """Per-listener events by socket inode; drains the peak-queue map (peaks since last read)."""
        peaks = {_number(key): _number(value) for key, value in _drain(self.bpf["peaks"])}
        queued = {_number(key): value for key, value in _entries(self.bpf["stats"])}
        # A listener whose connections were all queued before the probes came has accepts alone.
        accepted = {_number(key): value for key, value in _entries(self.bpf["accepted"])}
        no_stats, none_taken = self.bpf["stats"].Leaf(), self.bpf["accepted"].Leaf()  # zeroed
        result = {}
        for inode in queued.keys() | accepted.keys():
            stats, taken = queued.get(inode, no_stats), accepted.get(inode, none_taken)
            histogram = list(taken.wait_log2_us)
            requested = stats.requested_backlog
            waits = None
            if any(histogram):
                waits = {"p50": percentile(histogram, 0.5), "p99": percentile(histogram, 0.99)}
            result[inode] = ListenerEvents(
                enqueued=stats.enqueued, peak_queue=peaks.get(inode), ack_overflow=stats.ack_overflow,
                syn_overflow=stats.syn_overflow if self.syn_overflow_seen else None,
                synack_retransmits=stats.synack_retrans, accepts=taken.accepts, queue_wait_ms=waits,
                # listen(fd, -1) in C asks for the maximum: the kernel caps it at somaxconn.
                requested_backlog=(2**31 - 1 if requested >= 2**31 else requested) or None,
            )
        return result

    def forget_closed(self, observed: Iterable[int], live: set[int]) -> None:
        """Drop the entries of listeners that two sweeps in a row did not find (closed, or in a
        namespace nobody watches): ``observed`` are the inodes read() returned, ``live`` those the
        sweep found. One sweep is not proof: a listener opened after the sweep read its namespace may
        have entries already. Nothing in the kernel does this: seeing a listener close takes a probe
        on every socket's state changes, six calls on every connection's path for a rare event, and
        the maps are LRU, so at worst what is left behind is evicted, never leaked."""
        unseen = set(observed) - live
        gone = unseen & self._unseen
        for name in ("stats", "accepted", "peaks"):
            table = self.bpf[name]
            for inode in gone:
                with contextlib.suppress(KeyError):
                    del table[table.Key(inode)]
        self._unseen = unseen

    def pause(self) -> list[str]:
        """Detach the probes, keeping programs and maps, so that a benchmark can alternate rounds with
        and without them a moment apart instead of a compile apart. Returns the probes that stay:
        bcc attaches fentry programs as it loads them."""
        staying = []
        for target, (way, _, _) in self._reattach.items():
            if way.kind == "raw_tracepoint":
                self.bpf.detach_raw_tracepoint(tp=target.split(":")[1])
            elif way.kind == "tracepoint":
                self.bpf.detach_tracepoint(tp=target)
                if "arguments kept by" in self.probes[target]:
                    self.bpf.detach_tracepoint(tp=entry_of(target))
            elif self.probes[target].startswith("attached (kprobe"):
                self.bpf.detach_kprobe(event=target)
            else:
                staying.append(target)
        return staying

    def resume(self) -> None:
        """Attach again what pause() detached."""
        for target, (way, features, refused) in self._reattach.items():
            if self.probes[target] != "attached (fentry)":
                state = _attach(self.bpf, way, target, features, refused)
                if state != self.probes[target]:
                    raise RuntimeError(f"{target} {state} again (was {self.probes[target]})")

    def status(self) -> dict[str, Any]:
        return {"active": True, "probes": dict(self.probes), "mode": self.mode, "offsets": self.offsets_from,
                "lost_events": self.lost}

    def close(self) -> None:
        self.bpf.cleanup()


def _number(value: Any) -> int:
    """A map key or value as int: bcc gives ctypes objects from items(), ints from batch reads."""
    return int(getattr(value, "value", value))


def _entries(table: Any) -> list[tuple[Any, Any]]:
    """All entries with batch lookups (one syscall per batch, not two per entry) where the kernel
    has them (5.6+)."""
    try:
        return list(table.items_lookup_batch())
    except Exception:  # bcc raises bare Exception where batch operations are missing
        return list(table.items())


def _drain(table: Any) -> list[tuple[Any, Any]]:
    """All entries, deleted as they are read, so what arrives meanwhile counts for the next read."""
    try:
        return list(table.items_lookup_and_delete_batch())
    except Exception:  # no batch operations: read, then delete one by one
        entries = list(table.items())
        for key, _ in entries:
            try:
                del table[key]
            except KeyError:
                continue
        return entries


def _errno_text(exc: Exception) -> str:
    text = str(exc)
    errno_value = ctypes.get_errno()
    # bcc words EPERM from BPF_PROG_LOAD as "Need super-user privileges", even for root.
    if "Operation not permitted" in text or "super-user" in text or errno_value == 1:
        return "fentry refused (EPERM)"
    if "524" in text or errno_value == 524:
        return "fentry not supported for this function (ENOTSUPP)"
    return f"fentry failed: {text.splitlines()[0] if text else type(exc).__name__}"


def _attach(bpf: Any, way: Way, target: str, features: KernelFeatures, refused: dict[str, str]) -> str:
    try:
        if way.kind == "raw_tracepoint":
            bpf.attach_raw_tracepoint(tp=target.split(":")[1], fn_name=way.program)
            return "attached (raw tracepoint)"
        if way.kind == "tracepoint":
            kept = way.reads_syscall_args and not registers_readable(features)
            if kept:
                bpf.attach_tracepoint(tp=entry_of(target), fn_name="on_syscall_enter")
            bpf.attach_tracepoint(tp=target, fn_name=way.program)
            return f"attached (tracepoint; arguments kept by {entry_of(target)})" if kept else "attached (tracepoint)"
        if way.fentry_define and features.btf and target not in refused:
            return "attached (fentry)"
        why_fentry = refused.get(target, "fentry not tried (no BTF)")
        if not features.kprobes:
            return f"not attached: {why_fentry}; kprobes absent (no {TRACEFS}/kprobe_events)"
        bpf.attach_kprobe(event=target, fn_name=way.program)
        return f"attached (kprobe; {why_fentry})"
    except Exception as exc:  # bcc raises bare Exception
        return f"not attached: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def describe_mode(probes: dict[str, str], syn_seen: bool) -> str:
    missing = sorted(name for name, state in probes.items() if not state.startswith("attached"))
    text = "full" if not missing else "partial: " + ", ".join(missing) + " not observed"
    if not syn_seen:
        text += "; SYN-stage drops are counted only from the sweep (socket drops, ListenOverflows)"
    # accept() through io_uring (IORING_OP_ACCEPT) makes no accept syscall for the tracepoints to see.
    return text + "; queue wait covers accept()/accept4(), not io_uring accepts"


def unavailable_status(reason: str) -> dict[str, Any]:
    return {"active": False, "probes": {}, "mode": reason}

"""sock_diag requests and decoders: listening sockets (TCP v4/v6 via INET_DIAG, Unix via UNIX_DIAG), and on
request a listener's connections (established TCP sockets with their tcp_info, connected Unix sockets).

Pure functions over bytes: the socket I/O lives in ``netlink.py``. The decoder unpacks the fixed
structs with precompiled ``struct.Struct`` objects and looks at only the attributes it needs, because
building an object per netlink attribute (as pyroute2 does) costs 30x more than ``ss`` at 10,000
listeners. A malformed message is skipped and counted; it never raises.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from aqtune.records import Connection, Listener

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3

TCP_LISTEN = 10
INET_DIAG_SKMEMINFO = 7
SK_MEMINFO_DROPS = 8
UDIAG_SHOW_NAME = 0x01
UDIAG_SHOW_RQLEN = 0x10
UDIAG_SHOW_MEMINFO = 0x20
UDIAG_SHOW_UID = 0x40
UNIX_DIAG_NAME = 0
UNIX_DIAG_RQLEN = 4
UNIX_DIAG_MEMINFO = 5
UNIX_DIAG_UID = 7
UNIX_LISTENING_TYPES = (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)

NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLATTR = struct.Struct("=HH")  # len, type
U32 = struct.Struct("=I")
I32 = struct.Struct("=i")
RQLEN = struct.Struct("=II")
# inet_diag_req_v2: family, protocol, ext, pad, states, sockid (ports, addrs, if, cookie)
INET_REQ = struct.Struct("=BBBBI4s16s16sIQ")
# inet_diag_msg: family, state, timer, retrans, sport, dport (network order), src, dst, if,
# cookie[2], expires, rqueue, wqueue, uid, inode
INET_MSG = struct.Struct("=BBBB2s2s16s16sIIIIIIII")
# unix_diag_req: family, protocol, pad, states, ino, show, cookie[2]
UNIX_REQ = struct.Struct("=BBHIIIQ")
# unix_diag_msg: family, type, state, pad, ino, cookie[2]
UNIX_MSG = struct.Struct("=BBBBIII")

NO_COOKIE = 0xFFFFFFFFFFFFFFFF  # INET_DIAG_NOCOOKIE: do not filter by cookie

# Connections (asked for only when someone looks at a listener's connections, or it is saturated).
TCP_ESTABLISHED = 1
TCP_CLOSE_WAIT = 8  # the client closed its side; the server has not yet: it still holds a worker
CONNECTION_STATES = {TCP_ESTABLISHED: "established", TCP_CLOSE_WAIT: "close-wait"}
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_INFO = 2
INET_DIAG_BC_JMP = 1  # always takes its ``no`` jump
INET_DIAG_BC_S_EQ = 11  # source (local) port equal to the port in the next op's ``no`` field
BC_OP = struct.Struct("=BBH")  # inet_diag_bc_op: code, yes, no
UDIAG_SHOW_VFS = 0x02
UDIAG_SHOW_PEER = 0x04
UNIX_DIAG_VFS = 1
UNIX_DIAG_PEER = 2
VFS = struct.Struct("=II")  # unix_diag_vfs: ino, dev
# struct tcp_info, as far as aqtune reads it. The kernel sends as much of it as it knows, so a field
# past the attribute's end is absent (an older kernel), never garbage.
TCPI_STATE = struct.Struct("=B")
TCPI_TIMES = struct.Struct("=IIII")  # last_data_sent, last_ack_sent (never set), last_data_recv, last_ack_recv
TCPI_TIMES_AT = 44
TCPI_BYTES = struct.Struct("=QQ")  # bytes_acked, bytes_received (Linux 4.1+)
TCPI_BYTES_AT = 120
MAX_PORTS_FILTERED = 64  # ports one filtered dump asks for; more become a dump of every connection


class NetlinkError(Exception):
    """The kernel answered a dump request with NLMSG_ERROR."""

    def __init__(self, errno: int) -> None:
        super().__init__(errno)
        self.errno = errno


@dataclass(slots=True)
class DumpProgress:
    """What one dump has produced so far, fed chunk by chunk as recv() returns them."""

    netns: str
    rows: list[Listener]
    skipped: int = 0
    done: bool = False
    meminfo_at: int = 0  # offset of SKMEMINFO within a message, learnt from the first one
    # Listeners share few addresses; formatting each once per dump saves a third of decode time.
    ip_text: dict[tuple[int, bytes, int], str] = field(default_factory=dict)
    # Interface names by index in the dumped namespace, for listeners bound to a device; ss shows
    # them as 127.0.0.1%eth0:80, and two such listeners differ only there.
    ifnames: dict[int, str] = field(default_factory=dict)


class _Progress(Protocol):
    skipped: int
    done: bool


def _request(payload: bytes, seq: int) -> bytes:
    header = NLMSG.pack(NLMSG.size + len(payload), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return header + payload


def inet_listen_request(family: int, seq: int = 1) -> bytes:
    """Dump request for TCP listeners of one address family, with SK_MEMINFO (drops)."""
    payload = INET_REQ.pack(
        family, socket.IPPROTO_TCP, 1 << (INET_DIAG_SKMEMINFO - 1), 0, 1 << TCP_LISTEN,
        b"", b"", b"", 0, NO_COOKIE,
    )
    return _request(payload, seq)


def unix_listen_request(seq: int = 1) -> bytes:
    """Dump request for listening Unix sockets with name, queue lengths, meminfo and uid."""
    show = UDIAG_SHOW_NAME | UDIAG_SHOW_RQLEN | UDIAG_SHOW_MEMINFO | UDIAG_SHOW_UID
    payload = UNIX_REQ.pack(socket.AF_UNIX, 0, 0, 1 << TCP_LISTEN, 0, show, NO_COOKIE)
    return _request(payload, seq)


def _ip_text(family: int, raw_addr: bytes, ifindex: int, ifnames: dict[int, str]) -> str:
    """The part of ``address`` before the port: ``127.0.0.1``, ``[::1]``, ``[fe80::1]%eth0``."""
    if family == socket.AF_INET:
        text = socket.inet_ntop(socket.AF_INET, raw_addr[:4])
    else:
        text = f"[{socket.inet_ntop(socket.AF_INET6, raw_addr)}]"
    if ifindex:
        text += "%" + _ifname_text(ifnames.get(ifindex, str(ifindex)))
    return text


def _ifname_text(name: str) -> str:
    """An interface name as valid text. Names are any bytes but '/', ':' and whitespace, and
    socket.if_nameindex() keeps the non-UTF-8 ones as lone surrogates, which no UTF-8 sink (the
    journal, a terminal) can write: shown as ``\\xNN`` like the bytes of a Unix path."""
    if name.isascii():
        return name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def format_unix_path(raw: bytes) -> str:
    """A Unix socket's name as text: ``@name`` for an abstract one (as ss shows it), a path as it
    was bound, with ``./`` before a relative one.

    A relative path is shown as ``./0.0.0.0:443``, never as ``0.0.0.0:443``: it is whatever a
    user bound, and without the prefix it would show as, and match policy rules for, a TCP
    address. Absolute paths start with '/', abstract names with '@', TCP addresses with neither
    and never with '.', so the three cannot be taken for one another.
    """
    if raw[:1] == b"\0":
        # NULs inside an abstract name are shown as '@' too, as ss does: never raw into a terminal.
        return "@" + raw[1:].replace(b"\0", b"@").decode("utf-8", "backslashreplace")
    path = raw.rstrip(b"\0").decode("utf-8", "backslashreplace")
    if path and not path.startswith(("/", "./", "../")):
        return "./" + path
    return path


def _frames(progress: _Progress, buf: bytes | bytearray | memoryview, size: int) -> Iterator[tuple[int, int]]:
    """Split a recv() chunk into (payload offset, payload end) per data message.

    Handles DONE and ERROR; a frame whose length cannot be trusted ends the chunk, since nothing
    after it can be located.
    """
    offset = 0
    while offset + NLMSG.size <= size:
        length, msg_type = NLMSG.unpack_from(buf, offset)[:2]
        if length < NLMSG.size or offset + length > size:
            progress.skipped += 1
            return
        if msg_type in (NLMSG_DONE, NLMSG_ERROR):
            # Both may carry a negative errno: a dump can end in an error, not only start with one.
            if length >= NLMSG.size + 4:
                errno = -I32.unpack_from(buf, offset + NLMSG.size)[0]
                if errno > 0:
                    raise NetlinkError(errno)
            progress.done = True
            return
        if msg_type == SOCK_DIAG_BY_FAMILY:
            yield offset + NLMSG.size, offset + length
        offset += (length + 3) & ~3
    if offset < size:
        progress.skipped += 1


def _meminfo_drops(buf: bytes | bytearray | memoryview, value_at: int, value_len: int) -> int | None:
    if value_len < (SK_MEMINFO_DROPS + 1) * 4:
        return None
    return int(U32.unpack_from(buf, value_at + SK_MEMINFO_DROPS * 4)[0])


def decode_inet(progress: DumpProgress, buf: bytes | bytearray | memoryview, size: int) -> None:
    """Append the TCP listeners found in one recv() chunk of an INET_DIAG dump to ``progress.rows``."""
    rows = progress.rows
    netns = progress.netns
    unpack_msg = INET_MSG.unpack_from
    unpack_attr = NLATTR.unpack_from
    ips = progress.ip_text
    # Every message of a dump carries the same attributes in the same order, so SKMEMINFO is
    # looked for where it was last found before scanning the attribute list.
    meminfo_at = progress.meminfo_at
    for start, end in _frames(progress, buf, size):
        if end - start < INET_MSG.size:
            progress.skipped += 1
            continue
        (family, _state, _timer, _retrans, sport, _dport, src, _dst, ifindex, cookie_lo, cookie_hi,
         _expires, rqueue, wqueue, uid, inode) = unpack_msg(buf, start)
        drops = None
        attr = start + meminfo_at
        attr_len = attr_type = 0
        if meminfo_at and attr + 4 <= end:
            attr_len, attr_type = unpack_attr(buf, attr)
        if attr_type == INET_DIAG_SKMEMINFO and 4 <= attr_len <= end - attr:
            drops = _meminfo_drops(buf, attr + 4, attr_len - 4)
        else:
            attr = start + INET_MSG.size
            while attr + 4 <= end:
                attr_len, attr_type = unpack_attr(buf, attr)
                if attr_len < 4 or attr + attr_len > end:
                    break
                if attr_type == INET_DIAG_SKMEMINFO:
                    drops = _meminfo_drops(buf, attr + 4, attr_len - 4)
                    progress.meminfo_at = meminfo_at = attr - start
                attr += (attr_len + 3) & ~3
            if attr < end:  # an attribute ran past its message: nothing in it can be trusted
                progress.skipped += 1
                continue
        key = (family, src, ifindex)
        ip = ips.get(key)
        if ip is None:
            ip = ips[key] = _ip_text(family, src, ifindex, progress.ifnames)
        port = (sport[0] << 8) | sport[1]
        rows.append(Listener(netns, "tcp" if family == socket.AF_INET else "tcp6", f"{ip}:{port}", port,
                             rqueue, wqueue, drops, cookie_lo | (cookie_hi << 32), inode, uid))


def decode_unix(progress: DumpProgress, buf: bytes | bytearray | memoryview, size: int) -> None:
    """Append the listening Unix stream/seqpacket sockets in one recv() chunk of a UNIX_DIAG dump."""
    for start, end in _frames(progress, buf, size):
        if end - start < UNIX_MSG.size:
            progress.skipped += 1
            continue
        _family, sock_type, _state, _pad, inode, cookie_lo, cookie_hi = UNIX_MSG.unpack_from(buf, start)
        if sock_type not in UNIX_LISTENING_TYPES:
            continue
        address = ""
        queue = backlog = 0
        drops = uid = None
        has_rqlen = False
        attr = start + UNIX_MSG.size
        while attr + 4 <= end:
            attr_len, attr_type = NLATTR.unpack_from(buf, attr)
            if attr_len < 4 or attr + attr_len > end:
                has_rqlen = False  # a broken attribute list: skip the whole message
                break
            value_at, value_len = attr + 4, attr_len - 4
            if attr_type == UNIX_DIAG_NAME:
                address = format_unix_path(bytes(buf[value_at:value_at + value_len]))
            elif attr_type == UNIX_DIAG_RQLEN and value_len >= RQLEN.size:
                queue, backlog = RQLEN.unpack_from(buf, value_at)
                has_rqlen = True
            elif attr_type == UNIX_DIAG_MEMINFO:
                drops = _meminfo_drops(buf, value_at, value_len)
            elif attr_type == UNIX_DIAG_UID and value_len >= 4:
                uid = int(U32.unpack_from(buf, value_at)[0])
            attr += (attr_len + 3) & ~3
        if not has_rqlen:
            progress.skipped += 1
            continue
        progress.rows.append(Listener(progress.netns, "unix", address, None, queue, backlog, drops,
                                      cookie_lo | (cookie_hi << 32), inode, uid))


# --- connections -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TcpInfo:
    """The part of struct tcp_info aqtune uses: ms since data was last sent and received (both clocks
    start at the handshake), and byte counts where the kernel has them."""

    state: int
    last_data_sent_ms: int
    last_data_recv_ms: int
    bytes_acked: int | None
    bytes_received: int | None


def decode_tcp_info(buf: bytes | bytearray | memoryview, at: int = 0, size: int | None = None) -> TcpInfo | None:
    """struct tcp_info of ``size`` bytes at ``at``; None when too short to hold the times."""
    size = len(buf) - at if size is None else size
    if size < TCPI_TIMES_AT + TCPI_TIMES.size:
        return None
    sent, _ack_sent, received, _ack_received = TCPI_TIMES.unpack_from(buf, at + TCPI_TIMES_AT)
    acked = got = None
    if size >= TCPI_BYTES_AT + TCPI_BYTES.size:
        acked, got = TCPI_BYTES.unpack_from(buf, at + TCPI_BYTES_AT)
    return TcpInfo(TCPI_STATE.unpack_from(buf, at)[0], sent, received, acked, got)


def port_filter(ports: Iterable[int]) -> bytes:
    """inet_diag bytecode keeping sockets whose local port is one of ``ports`` (ss's ``sport = :A or
    sport = :B``, built the way ss builds it, which the kernel's audit accepts).

    Each test is an S_EQ op, whose ``yes`` goes on to the next op, and an op carrying the port; after
    every test but the last a JMP whose ``no`` jumps to the end (accept), reached only on a match. A
    failed test's ``no`` skips to the next test; the last one's lands past the end: a rejection.
    """
    ports = sorted(set(ports))
    tests = [BC_OP.pack(INET_DIAG_BC_S_EQ, 8, 12) + BC_OP.pack(0, 0, port) for port in ports]
    program = b""
    for index, test in enumerate(tests):
        program += test
        if index < len(tests) - 1:
            rest = sum(len(t) + 4 for t in tests[index + 1:]) - 4
            program += BC_OP.pack(INET_DIAG_BC_JMP, 4, rest + 4)
    return program


def inet_connections_request(family: int, ports: Iterable[int] | None = None, seq: int = 1) -> bytes:
    """Dump request for established (and close-wait) TCP sockets of one family with their tcp_info;
    only those on ``ports`` (local) when given, filtered in the kernel, so a busy namespace's other
    connections cost nothing."""
    payload = INET_REQ.pack(
        family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0,
        (1 << TCP_ESTABLISHED) | (1 << TCP_CLOSE_WAIT), b"", b"", b"", 0, NO_COOKIE,
    )
    wanted = sorted(set(ports)) if ports is not None else []
    if wanted and len(wanted) <= MAX_PORTS_FILTERED:
        program = port_filter(wanted)
        payload += NLATTR.pack(NLATTR.size + len(program), INET_DIAG_REQ_BYTECODE) + program
    return _request(payload, seq)


def unix_connections_request(seq: int = 1) -> bytes:
    """Dump request for listening and connected Unix sockets with name, file (VFS), peer, queues and uid:
    an accepted socket carries its listener's name and file, which is how it is matched to it."""
    show = UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN | UDIAG_SHOW_UID
    payload = UNIX_REQ.pack(socket.AF_UNIX, 0, 0, (1 << TCP_LISTEN) | (1 << TCP_ESTABLISHED), 0, show, NO_COOKIE)
    return _request(payload, seq)


@dataclass(slots=True)
class ConnectionDump:
    """What a dump of TCP connections has produced so far (see DumpProgress)."""

    netns: str
    rows: list[Connection] = field(default_factory=list)
    skipped: int = 0
    done: bool = False
    limit: int = 0  # rows kept at most (0: all); any local user can open connections by the hundred thousand
    unread: int = 0  # rows past the limit, counted only
    ip_text: dict[tuple[int, bytes, int], str] = field(default_factory=dict)
    ifnames: dict[int, str] = field(default_factory=dict)


def decode_inet_connections(progress: ConnectionDump, buf: bytes | bytearray | memoryview, size: int) -> None:
    """Append the TCP connections in one recv() chunk of an INET_DIAG dump to ``progress.rows``."""
    ips = progress.ip_text
    for start, end in _frames(progress, buf, size):
        if end - start < INET_MSG.size:
            progress.skipped += 1
            continue
        (family, state, _timer, _retrans, sport, dport, src, dst, ifindex, cookie_lo, cookie_hi,
         _expires, rqueue, wqueue, uid, inode) = INET_MSG.unpack_from(buf, start)
        info = None
        attr = start + INET_MSG.size
        while attr + 4 <= end:
            attr_len, attr_type = NLATTR.unpack_from(buf, attr)
            if attr_len < 4 or attr + attr_len > end:
                break
            if attr_type == INET_DIAG_INFO:
                info = decode_tcp_info(buf, attr + 4, attr_len - 4)
            attr += (attr_len + 3) & ~3
        if attr < end:
            progress.skipped += 1
            continue
        if progress.limit and len(progress.rows) >= progress.limit:
            progress.unread += 1
            continue
        texts = []
        for raw, index in ((src, ifindex), (dst, 0)):
            key = (family, raw, index)
            text = ips.get(key)
            if text is None:
                text = ips[key] = _ip_text(family, raw, index, progress.ifnames)
            texts.append(text)
        progress.rows.append(Connection(
            progress.netns, "tcp" if family == socket.AF_INET else "tcp6",
            f"{texts[0]}:{(sport[0] << 8) | sport[1]}", f"{texts[1]}:{(dport[0] << 8) | dport[1]}",
            CONNECTION_STATES.get(state, str(state)), inode, cookie_lo | (cookie_hi << 32), uid,
            recv_idle=info.last_data_recv_ms / 1000 if info else None,
            send_idle=info.last_data_sent_ms / 1000 if info else None,
            bytes_in=info.bytes_received if info else None, bytes_out=info.bytes_acked if info else None,
            rqueue=rqueue, wqueue=wqueue,
        ))


@dataclass(frozen=True, slots=True)
class UnixSocket:
    """A listening or connected Unix socket, as far as matching connections to listeners needs."""

    inode: int  # 0 for a connection still in its listener's queue
    cookie: int
    listening: bool
    name: str  # an accepted socket carries its listener's name
    vfs: tuple[int, int] | None  # (inode, device) of the socket file of a path name; None for abstract ones
    peer: int  # the inode of the socket at the other end
    rqueue: int
    wqueue: int
    uid: int | None


@dataclass(slots=True)
class UnixDump:
    netns: str
    rows: list[UnixSocket] = field(default_factory=list)
    skipped: int = 0
    done: bool = False
    limit: int = 0  # as ConnectionDump's
    unread: int = 0


def decode_unix_sockets(progress: UnixDump, buf: bytes | bytearray | memoryview, size: int) -> None:
    """Append the stream/seqpacket sockets in one recv() chunk of a UNIX_DIAG dump made with
    unix_connections_request(); unnamed ones cannot belong to a listener and are left out."""
    for start, end in _frames(progress, buf, size):
        if end - start < UNIX_MSG.size:
            progress.skipped += 1
            continue
        _family, sock_type, state, _pad, inode, cookie_lo, cookie_hi = UNIX_MSG.unpack_from(buf, start)
        if sock_type not in UNIX_LISTENING_TYPES:
            continue
        name = ""
        vfs = None
        peer = queue = backlog = 0
        uid = None
        attr = start + UNIX_MSG.size
        while attr + 4 <= end:
            attr_len, attr_type = NLATTR.unpack_from(buf, attr)
            if attr_len < 4 or attr + attr_len > end:
                break
            value_at, value_len = attr + 4, attr_len - 4
            if attr_type == UNIX_DIAG_NAME:
                name = format_unix_path(bytes(buf[value_at:value_at + value_len]))
            elif attr_type == UNIX_DIAG_VFS and value_len >= VFS.size:
                vfs = VFS.unpack_from(buf, value_at)
            elif attr_type == UNIX_DIAG_PEER and value_len >= 4:
                peer = U32.unpack_from(buf, value_at)[0]
            elif attr_type == UNIX_DIAG_RQLEN and value_len >= RQLEN.size:
                queue, backlog = RQLEN.unpack_from(buf, value_at)
            elif attr_type == UNIX_DIAG_UID and value_len >= 4:
                uid = int(U32.unpack_from(buf, value_at)[0])
            attr += (attr_len + 3) & ~3
        if attr < end:
            progress.skipped += 1
            continue
        if not name:
            continue
        if progress.limit and len(progress.rows) >= progress.limit and state != TCP_LISTEN:
            progress.unread += 1  # listeners are always kept: connections are matched through them
        else:
            progress.rows.append(UnixSocket(inode, cookie_lo | (cookie_hi << 32), state == TCP_LISTEN, name,
                                            vfs, peer, queue, backlog, uid))

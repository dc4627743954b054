"""What iproute2 (``ss``, ``nstat``) says about listeners and counters: the reference aqtune is checked against.

Pure parsers over command output, so the parsing itself can be read and checked without a kernel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_INODE = re.compile(r"\bino:(\d+)")
_COOKIE = re.compile(r"(?<![\w:])sk:([0-9a-f]+)")
_UID = re.compile(r"\buid:(\d+)")
_SKMEM = re.compile(r"\bskmem:\(([^)]*)\)")
_DROPS = re.compile(r"(?:^|,)d(\d+)(?:,|$)")
_PID = re.compile(r"\bpid=(\d+)")


@dataclass(frozen=True, slots=True)
class SsListener:
    proto: str  # "tcp", "tcp6" or "unix", as aqtune names them
    address: str
    queue: int  # Recv-Q
    backlog: int  # Send-Q
    inode: int
    cookie: int | None  # ss prints it for TCP only (-e "sk:" in hex)
    uid: int  # ss prints "uid:" only when it is not 0, and never for Unix sockets
    drops: int | None  # skmem "d" field
    pids: frozenset[int]  # from -p "users:"; empty without -p


def _logical_lines(text: str) -> list[str]:
    """ss wraps one socket over several lines (skmem on a tab-indented line); join them back."""
    lines: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if line[0].isspace() and lines:
            lines[-1] += " " + line.strip()
        else:
            lines.append(line.strip())
    return lines


def _drops(line: str) -> int | None:
    skmem = _SKMEM.search(line)
    if skmem is None:
        return None
    drops = _DROPS.search(skmem.group(1))
    return int(drops.group(1)) if drops else None


def parse_ss_tcp(text: str) -> dict[str, SsListener]:
    """``ss -ltnmeH`` output (``-ltnmepH`` for owners), by local address."""
    rows = {}
    for line in _logical_lines(text):
        words = line.split()
        if words[0] != "LISTEN":
            continue
        address = words[3]
        inode = _INODE.search(line)
        cookie = _COOKIE.search(line)
        uid = _UID.search(line)
        rows[address] = SsListener(
            proto="tcp6" if address.startswith("[") else "tcp",
            address=address,
            queue=int(words[1]),
            backlog=int(words[2]),
            inode=int(inode.group(1)) if inode else 0,
            cookie=int(cookie.group(1), 16) if cookie else None,
            uid=int(uid.group(1)) if uid else 0,
            drops=_drops(line),
            pids=frozenset(int(pid) for pid in _PID.findall(line)),
        )
    return rows


def parse_ss_unix(text: str) -> dict[str, SsListener]:
    """``ss -xlmH`` (or ``-xlmpH``) output (listening stream and seqpacket sockets only), by local address."""
    rows = {}
    for line in _logical_lines(text):
        words = line.split()
        # `ss -xl` also lists unconnected sockets (state UNCONN); they are not listeners.
        if words[0] not in ("u_str", "u_seq") or words[1] != "LISTEN":
            continue
        address = words[4]
        rows[address] = SsListener(
            proto="unix",
            address=address,
            queue=int(words[2]),
            backlog=int(words[3]),
            inode=int(words[5]),
            cookie=None,
            uid=0,
            drops=_drops(line),
            pids=frozenset(int(pid) for pid in _PID.findall(line)),
        )
    return rows


def parse_nstat(text: str) -> dict[str, int]:
    """``nstat -asz`` output: counter name -> absolute value."""
    counters = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and not line.startswith("#") and words[1].isdigit():
            counters[words[0]] = int(words[1])
    return counters

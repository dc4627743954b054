"""Netlink socket I/O for sock_diag dumps; decoding stays in ``sockdiag.py``."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Protocol, TypeVar

from aqtune.collect.sockdiag import NETLINK_SOCK_DIAG, DumpProgress
from aqtune.records import Listener

RECV_BUFFER = 1 << 16  # the kernel fills at most ~32 KiB per dump chunk
DUMP_TIMEOUT = 5.0  # seconds; a dump never takes this long unless the kernel is wedged

Decoder = Callable[[DumpProgress, bytearray, int], None]


def open_diag_socket() -> socket.socket:
    """A sock_diag socket bound to the calling thread's network namespace at creation time."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.settimeout(DUMP_TIMEOUT)
    return sock


def dump(sock: socket.socket, request: bytes, decoder: Decoder, netns: str,
         rows: list[Listener], ifnames: dict[int, str] | None = None,
         drain: Callable[[list[Listener]], None] | None = None) -> int:
    """Send one dump request and decode replies into ``rows``; returns skipped messages.

    With ``drain``, each chunk's rows are handed to it and ``rows`` emptied again, so a dump of any size
    holds one chunk's rows at a time (the daemon keeps only the listeners its budget tracks).
    """
    def decode(progress: DumpProgress, buf: bytearray, size: int) -> None:
        decoder(progress, buf, size)
        if drain is not None and rows:
            drain(rows)
            rows.clear()

    return dump_into(sock, request, DumpProgress(netns, rows, ifnames=ifnames or {}), decode).skipped


class _Progress(Protocol):
    done: bool


P = TypeVar("P", bound=_Progress)


def dump_into(sock: socket.socket, request: bytes, progress: P, decoder: Callable[[P, bytearray, int], None]) -> P:
    """Send one dump request and feed every reply chunk to ``decoder`` until the dump is done."""
    sock.sendall(request)
    buf = bytearray(RECV_BUFFER)
    while not progress.done:
        size = sock.recv_into(buf)
        if size == 0:
            break
        decoder(progress, buf, size)
    return progress

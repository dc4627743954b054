"""Netlink socket I/O for sock_diag dumps; decoding stays in ``sockdiag.py``."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from aqtune.collect.sockdiag import NETLINK_SOCK_DIAG, DumpProgress
from aqtune.records import Listener

RECV_BUFFER = 1 << 16  # the kernel fills at most ~32 KiB per dump chunk
DUMP_TIMEOUT = 5.0  # seconds; a dump never takes this long unless the kernel is wedged

Decoder = Callable[[DumpProgress, bytearray, int], None]
# Bytes of reply chunks a ChunkCache keeps, all dumps of a sweep together: ~16 per listener, so the
# chunks of 100,000 listeners; past it chunks are decoded every time (any user can make listeners).
CHUNK_CACHE_BYTES = 16 << 20
MAX_REST = 8  # sweeps a ChunkCache keeps nothing for at most, while listeners churn

_Row = tuple[str, str, str, int | None, int, int, int | None, int, int, int | None]


@dataclass(frozen=True, slots=True)
class _Decoded:
    """What one reply chunk decoded to, and in which namespace (names of interfaces included)."""

    netns: str
    ifnames: dict[int, str]
    rows: list[_Row]
    skipped: int
    done: bool


@dataclass(slots=True)
class ChunkCache:
    """The listeners each reply chunk of the last sweep's dumps decoded to, by the chunk's bytes.

    A quiet namespace's dump comes back byte for byte as before (same sockets, queues, drops, in
    the same order), and decoding it again was most of a quiet sweep's cost; a chunk whose bytes
    changed anywhere is decoded again. Holds the chunks of the last sweep only (``rotate`` between
    sweeps), at most ``limit`` bytes of them.

    While listeners come and go (a churn of thousands a second), almost no chunk comes back and
    keeping them only costs copies and memory: after a sweep that found fewer than half of the
    chunks it looked for, it keeps nothing for a rest of 1, 2, 4 up to MAX_REST sweeps, then tries
    again with one sweep's chunks.
    """

    limit: int = CHUNK_CACHE_BYTES
    previous: dict[bytes, _Decoded] = field(default_factory=dict)
    current: dict[bytes, _Decoded] = field(default_factory=dict)
    held: int = 0
    looked: int = 0  # chunks of this sweep looked for in the last one's
    found: int = 0  # of them, found
    rest: int = 0  # sweeps the last rest lasted (0: keeping; doubles while lookups keep missing)
    resting: int = 0  # sweeps of it left, this one included

    @property
    def keeping(self) -> bool:
        return self.resting == 0

    def rotate(self) -> None:
        """A new sweep: what the last one decoded is what this one may reuse."""
        if self.looked:
            missed = 2 * self.found < self.looked
            self.rest = min(max(2 * self.rest, 1), MAX_REST) if missed else 0
            self.resting = self.rest
        elif self.resting:
            self.resting -= 1
        self.previous = {} if self.resting else self.current
        self.current, self.held, self.looked, self.found = {}, 0, 0, 0

    def keep(self, raw: bytes, decoded: _Decoded) -> None:
        if self.held + len(raw) <= self.limit:
            self.current[raw] = decoded
            self.held += len(raw)


def _row(listener: Listener) -> _Row:
    return (listener.netns, listener.proto, listener.address, listener.port, listener.queue, listener.backlog,
            listener.drops, listener.cookie, listener.inode, listener.uid)


def open_diag_socket() -> socket.socket:
    """A sock_diag socket bound to the calling thread's network namespace at creation time."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.settimeout(DUMP_TIMEOUT)
    return sock


def dump(sock: socket.socket, request: bytes, decoder: Decoder, netns: str,
         rows: list[Listener], ifnames: dict[int, str] | None = None,
         drain: Callable[[list[Listener]], None] | None = None, chunks: ChunkCache | None = None) -> int:
    """Send one dump request and decode replies into ``rows``; returns skipped messages.

    With ``drain``, each chunk's rows are handed to it and ``rows`` emptied again, so a dump of any size
    holds one chunk's rows at a time (the daemon keeps only the listeners its budget tracks). With
    ``chunks``, a chunk the last sweep decoded is not decoded again.
    """
    def decode(progress: DumpProgress, buf: bytearray, size: int) -> None:
        if chunks is None:
            decoder(progress, buf, size)
        else:
            _decode_cached(chunks, decoder, progress, buf, size)
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


def _decode_cached(chunks: ChunkCache, decoder: Decoder, progress: DumpProgress, buf: bytearray, size: int) -> None:
    if not chunks.keeping:  # resting: nothing kept last time to find (rotate emptied it), nothing to keep
        decoder(progress, buf, size)
        return
    raw = bytes(memoryview(buf)[:size])
    if chunks.previous:
        chunks.looked += 1
        hit = chunks.previous.get(raw)
        if hit is not None and hit.netns == progress.netns and hit.ifnames == progress.ifnames:
            chunks.found += 1
            progress.rows.extend([Listener(*row) for row in hit.rows])
            progress.skipped += hit.skipped
            progress.done = progress.done or hit.done
            chunks.keep(raw, hit)
            return
    start, skipped = len(progress.rows), progress.skipped
    decoder(progress, buf, size)
    chunks.keep(raw, _Decoded(progress.netns, dict(progress.ifnames), [_row(l) for l in progress.rows[start:]],
                              progress.skipped - skipped, progress.done))

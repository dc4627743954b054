"""Readers for the captured sock_diag fixtures (see tests/fixtures/capture_diag.py for how they were made).

Kept free of aqtune so that the tests' view of message boundaries does not depend on the code under test.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from aqtune.collect.sockdiag import DumpProgress
from aqtune.records import Listener

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
HEADER = struct.Struct("=IHHII")
DATA, ERROR, DONE = 20, 2, 3

Decoder = Callable[[DumpProgress, bytes, int], None]


@cache
def chunks(name: str) -> tuple[bytes, ...]:
    """The recv() chunks of one captured dump, from its (u32 length, bytes) records."""
    data = (FIXTURES / f"{name}.bin").read_bytes()
    out = []
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from("<I", data, offset)
        out.append(data[offset + 4:offset + 4 + length])
        offset += 4 + length
    return tuple(out)


@cache
def expected() -> dict[str, Any]:
    return dict(json.loads((FIXTURES / "expected.json").read_text()))


def netstat_text() -> str:
    return (FIXTURES / "netstat.txt").read_text()


def frames(buf: bytes) -> list[tuple[int, int, int]]:
    """(offset, length, type) of each message a reader can locate, stopping at the first bad length."""
    out = []
    offset = 0
    while offset + HEADER.size <= len(buf):
        length, msg_type = HEADER.unpack_from(buf, offset)[:2]
        if length < HEADER.size or offset + length > len(buf):
            break
        out.append((offset, length, msg_type))
        if msg_type in (DONE, ERROR):
            break
        offset += (length + 3) & ~3
    return out


def split_messages(chunk: bytes) -> list[bytes]:
    """The messages of a well-formed chunk, each with its alignment padding."""
    return [chunk[offset:offset + ((length + 3) & ~3)] for offset, length, _ in frames(chunk)]


def decode(decoder: Decoder, parts: tuple[bytes, ...] | list[bytes], netns: str = "capture") -> DumpProgress:
    progress = DumpProgress(netns, [])
    for part in parts:
        decoder(progress, part, len(part))
    return progress


def row_dict(row: Listener) -> dict[str, Any]:
    return {
        "proto": row.proto, "address": row.address, "port": row.port, "queue": row.queue,
        "backlog": row.backlog, "drops": row.drops, "inode": row.inode, "uid": row.uid,
    }

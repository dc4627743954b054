"""Structured entries to journald over its native protocol, and the structlog processor that sends them.

The native protocol keeps every field (AQTUNE_LISTENER=..., MESSAGE_ID=...) filterable with
``journalctl -u aqtune AQTUNE_NETNS=web``; lines on stdout would reach the journal as one MESSAGE.
The socket path can be overridden with AQTUNE_JOURNAL_SOCKET, which the tests point at a private
journald.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Mapping
from typing import Any

import structlog

DEFAULT_SOCKET = "/run/systemd/journal/socket"
PRIORITIES = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


def journal_socket() -> str:
    return os.environ.get("AQTUNE_JOURNAL_SOCKET", DEFAULT_SOCKET)


def encode(fields: Mapping[str, object]) -> bytes:
    """One datagram: ``KEY=value\\n`` per field, or KEY, newline, 64-bit length, bytes for values
    holding a newline."""
    parts = []
    for key, value in fields.items():
        data = str(value).encode("utf-8", "replace")
        name = key.upper().encode()
        if b"\n" in data:
            parts.append(name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name + b"=" + data + b"\n")
    return b"".join(parts)


class Journal:
    """A connectionless sender; a journald that is down costs a dropped entry, never the daemon."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or journal_socket()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # A stalled journald must not stall the loop (and its watchdog pings): a full socket
        # queue drops the entry and counts it.
        self.sock.setblocking(False)
        self.failures = 0
        self.dropped = 0

    def send(self, fields: Mapping[str, object]) -> bool:
        """False when journald is not there (the caller prints instead); a busy one drops."""
        try:
            self.sock.sendto(encode(fields), self.path)
        except BlockingIOError:
            self.dropped += 1
        except OSError:
            self.failures += 1
            return False
        return True

    def available(self) -> bool:
        return os.path.exists(self.path)


def field_name(key: str) -> str:
    """structlog keys become AQTUNE_* journal fields; journald's own names pass through."""
    upper = key.upper()
    if upper in ("MESSAGE_ID", "PRIORITY", "CODE_FILE", "CODE_LINE", "CODE_FUNC"):
        return upper
    return "AQTUNE_" + "".join(c if c.isalnum() else "_" for c in upper)


class JournalRenderer:
    """structlog's last processor when logging to journald: the event becomes one native entry.

    If journald cannot take it (not running, socket gone) the line goes to stderr instead, so
    nothing is lost from ``systemctl status`` either way.
    """

    def __init__(self, journal: Journal, identifier: str = "aqtune") -> None:
        self.journal = journal
        self.identifier = identifier

    def __call__(self, _logger: Any, method: str, event: dict[str, Any]) -> str:
        message = str(event.pop("event", ""))
        level = event.pop("level", method)
        event.pop("timestamp", None)
        fields: dict[str, object] = {
            "MESSAGE": message,
            "PRIORITY": event.pop("priority", PRIORITIES.get(level, 6)),
            "SYSLOG_IDENTIFIER": self.identifier,
        }
        fields.update({field_name(k): v for k, v in event.items() if v is not None})
        if not self.journal.send(fields):
            extras = " ".join(f"{k}={v}" for k, v in event.items() if v is not None)
            print(f"{level}: {message} {extras}".rstrip(), file=sys.stderr, flush=True)
        raise structlog.DropEvent

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

from aqtune.text import cescape

DEFAULT_SOCKET = "/run/systemd/journal/socket"
PRIORITIES = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
LEVELS = {number: name for name, number in PRIORITIES.items()}


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
        self.failures = 0  # journald absent or refusing
        self.dropped = 0  # journald's socket full: the entry is lost

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

    @property
    def refused(self) -> int:
        """Entries journald did not take, cumulative (shown in STATUS and the metrics)."""
        return self.failures + self.dropped

    def available(self) -> bool:
        return os.path.exists(self.path)


def field_name(key: str) -> str:
    """structlog keys become AQTUNE_* journal fields; journald's own names pass through."""
    upper = key.upper()
    if upper in ("MESSAGE_ID", "PRIORITY", "CODE_FILE", "CODE_LINE", "CODE_FUNC"):
        return upper
    return "AQTUNE_" + "".join(c if c.isalnum() else "_" for c in upper)


class JournalRenderer:
    """structlog's last processor when logging to journald: turns the event into the entry's fields.

    It only renders; JournalLogger sends. MESSAGE is C-escaped: it carries names any local user
    chose, and `journalctl -o cat` prints it raw to a terminal.
    """

    def __init__(self, identifier: str = "aqtune") -> None:
        self.identifier = identifier

    def __call__(self, _logger: Any, method: str, event: dict[str, Any]) -> dict[str, object]:
        level = event.pop("level", method)
        event.pop("timestamp", None)
        fields: dict[str, object] = {
            "MESSAGE": cescape(str(event.pop("event", ""))),
            "PRIORITY": event.pop("priority", PRIORITIES.get(level, 6)),
            "SYSLOG_IDENTIFIER": self.identifier,
        }
        fields.update({field_name(k): v for k, v in event.items() if v is not None})
        return fields


class JournalLogger:
    """The structlog logger that sends rendered entries; when journald cannot take one (not running,
    socket gone) the line goes to stderr, so nothing is lost from ``systemctl status`` either way."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def msg(self, **fields: object) -> None:
        if not self.journal.send(fields):
            print(console_line(fields), file=sys.stderr, flush=True)

    debug = info = warning = error = critical = msg


def console_line(fields: Mapping[str, object]) -> str:
    """An entry as one readable line: ``warning: MESSAGE key=value ...`` with structlog's key names."""
    level = LEVELS.get(int(str(fields.get("PRIORITY", 6))), "info")
    extras = " ".join(f"{key.removeprefix('AQTUNE_').lower()}={cescape(str(value))}" for key, value in fields.items()
                      if key not in ("MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER"))
    return f"{level}: {fields.get('MESSAGE', '')} {extras}".rstrip()


class JournalLoggerFactory:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def __call__(self, *_args: Any) -> JournalLogger:
        return JournalLogger(self.journal)

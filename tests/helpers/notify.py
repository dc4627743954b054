"""A real NOTIFY_SOCKET for the daemon tests: what systemd would receive from a Type=notify service.

systemd binds an AF_UNIX datagram socket and passes its path in NOTIFY_SOCKET; the service sends
``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``. This listener does the same, records
each message with its arrival time and sender pid (SO_PASSCRED, as systemd checks it), and can note
whether a file existed when a message arrived (the state file at READY=1).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCM_CREDENTIALS = 2
CREDENTIALS = struct.Struct("=iII")  # struct ucred: pid, uid, gid


@dataclass(frozen=True, slots=True)
class Notification:
    at: float  # time.monotonic() on arrival
    pid: int | None
    lines: tuple[str, ...]
    witness: bool | None  # whether ``watch`` existed on arrival

    def has(self, line: str) -> bool:
        return line in self.lines

    def value(self, key: str) -> str | None:
        return next((line.split("=", 1)[1] for line in self.lines if line.startswith(key + "=")), None)


class NotifyListener:
    """Bound at ``path``; receives in a thread until ``close``."""

    def __init__(self, path: Path, watch: Path | None = None) -> None:
        self.path = path
        self.watch = watch
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        # This thread may be kept off the CPU for a moment (a benchmark's load): the daemon must not block on
        # a full queue meanwhile.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.settimeout(0.2)
        self.messages: list[Notification] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="notify-listener", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data, ancillary, _flags, _address = self.sock.recvmsg(4096, socket.CMSG_SPACE(CREDENTIALS.size))
            except TimeoutError:
                continue
            except OSError:
                return
            arrived = time.monotonic()
            witness = self.watch.exists() if self.watch is not None else None
            pid = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == SCM_CREDENTIALS:
                    pid = CREDENTIALS.unpack_from(payload)[0]
            lines = tuple(line for line in data.decode(errors="replace").split("\n") if line)
            with self._lock:
                self.messages.append(Notification(arrived, pid, lines, witness))

    def received(self) -> list[Notification]:
        with self._lock:
            return list(self.messages)

    def with_line(self, line: str) -> list[Notification]:
        return [m for m in self.received() if m.has(line)]

    def with_key(self, key: str) -> list[Notification]:
        return [m for m in self.received() if m.value(key) is not None]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        self.sock.close()

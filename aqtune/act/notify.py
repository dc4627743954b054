"""sd_notify(3) of our own: READY=1, STATUS=, WATCHDOG=1, STOPPING=1 to systemd's $NOTIFY_SOCKET.

The protocol is one AF_UNIX datagram of ``KEY=value`` assignments, UTF-8. systemd splits it with
``strv_split_newlines()``: both '\\n' and '\\r' end an assignment, and a backslash takes the next
character literally (measured on bookworm's systemd 252; current systemd reads it the same way). So a
value carrying a newline became assignments of its own: a socket named ``@x\\nWATCHDOG_USEC=1\\nX``
in the STATUS line set a 1 us watchdog and had systemd kill aqtune forever; and a value ending in a
lone backslash made systemd drop the whole datagram.

Each value therefore goes through ``aqtune.text.printable`` (newlines, CR and every other control
character become ``\\n``-style escapes, which also keeps them off the terminal of whoever reads
``systemctl status``; idempotent, so a caller may have escaped already), and then every backslash is
doubled on the wire, so that what systemd stores is exactly the printable text. The message is
UTF-8 (the sdnotify package encoded Latin-1 and hid the error, so a name above U+00FF stopped every
status update) and at most NOTIFY_MAX bytes, which is what systemd accepts.

Sends never block (a busy PID 1 must not stall the loop that feeds the watchdog) and never raise:
a failed send is counted, and its assignments go out again with the next message.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping

from aqtune.text import ELLIPSIS, printable

NOTIFY_MAX = 4095  # systemd ignores a notification of NOTIFY_BUFFER_MAX (4096) bytes or more
RETRY = 0.25  # seconds before a failed watchdog ping is tried again (at most a quarter period)
KEY = re.compile(r"[A-Z][A-Z0-9_]*\Z")


def socket_address(value: str) -> str | bytes | None:
    """The address $NOTIFY_SOCKET names: an absolute path, or ``@name`` for the abstract namespace.
    None for anything else (systemd's sd_notify refuses relative paths too)."""
    if value.startswith("/") and len(value) > 1:
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


def _utf8_clip(text: str, budget: int) -> str:
    """``text`` cut to at most ``budget`` bytes of UTF-8, at a character boundary, marked."""
    data = text.encode()
    if len(data) <= budget:
        return text
    room = max(budget - len(ELLIPSIS), 0)
    return data[:room].decode(errors="ignore") + ELLIPSIS[:budget - room]


def message(assignments: Mapping[str, str]) -> bytes:
    """The datagram for ``assignments``: one ``KEY=value`` line each, which systemd reads back as
    ``KEY=printable(value)``; no value can add a line or void the datagram; longer values clipped
    so that the whole fits in NOTIFY_MAX bytes."""
    for key in assignments:
        if not KEY.match(key):
            raise ValueError(f"not an sd_notify variable name: {key!r}")
    values = {key: printable(value) for key, value in assignments.items()}
    overhead = sum(len(key) + 2 for key in values)  # "KEY=" and "\n"
    # Halved: doubling the backslashes may double a value's size.
    share = (NOTIFY_MAX - overhead) // max(len(values), 1) // 2
    lines = [f"{key}={_wire(_utf8_clip(value, share))}" for key, value in values.items()]
    return "\n".join(lines).encode()


def _wire(value: str) -> str:
    """A printable value as systemd must receive it to store it unchanged: backslashes doubled."""
    return value.replace("\\", "\\\\")


def watchdog_period(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises; None when
    there is no watchdog, or it is meant for another process (WATCHDOG_PID)."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    if not usec.isdigit() or int(usec) <= 0:
        return None
    return int(usec) / 2e6


class Notifier:
    """Notifications to systemd; silent (every method a no-op) when not started by systemd.

    ``failed`` counts sends that did not go out, ``last_error`` says why the last one did not.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.failed = 0
        self.last_error: str | None = None
        self.pending: dict[str, str] = {}  # assignments of failed sends, sent again with the next
        self.watchdog_every = watchdog_period(env, os.getpid())
        self.ping_due = 0.0  # time.monotonic() when the next WATCHDOG=1 is due
        self.where = env.get("NOTIFY_SOCKET", "")
        self.address = socket_address(self.where)
        self.sock: socket.socket | None = None
        if self.where and self.address is None:
            self.last_error = f"NOTIFY_SOCKET={self.where!r} is neither an absolute path nor @abstract; not notifying"

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **assignments: str | int) -> bool:
        """Send ``KEY=value`` assignments in one datagram; True when it went out."""
        if self.address is None:
            return False
        wanted = {**self.pending, **{key: str(value) for key, value in assignments.items()}}
        try:
            data = message(wanted)
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self.sock.setblocking(False)
            self.sock.sendto(data, self.address)
        except OSError as exc:  # EAGAIN (PID 1's queue full), ENOENT/ECONNREFUSED (socket gone), ...
            self.failed += 1
            self.last_error = f"sd_notify to {self.where}: {exc}"
            self.pending = wanted  # our own few keys, so bounded
            return False
        self.pending = {}
        return True

    def send(self, assignment: str) -> bool:
        """One ``KEY=value`` (everything after the first '=' is the value, newlines and all)."""
        key, sep, value = assignment.partition("=")
        if not sep:
            raise ValueError(f"not an sd_notify assignment: {assignment!r}")
        return self.notify(**{key: value})

    def until_due(self, now: float) -> float:
        """Seconds until the next watchdog ping is due (infinite without a watchdog)."""
        if self.watchdog_every is None:
            return float("inf")
        return max(self.ping_due - now, 0.0)

    def watchdog(self, now: float) -> None:
        """WATCHDOG=1 when half the period has passed since the last ping."""
        if self.watchdog_every is None or now < self.ping_due:
            return
        # A ping that did not go out is tried again soon, not half a period later; but not at once,
        # or a socket that is gone for good would have the loop spin.
        sent = self.notify(WATCHDOG=1)
        self.ping_due = now + (self.watchdog_every if sent else min(RETRY, self.watchdog_every / 4))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

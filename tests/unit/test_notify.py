"""aqtune.act.notify against a real AF_UNIX datagram socket, read as systemd reads it.

systemd splits a notification into assignments at newlines and CRs, takes a backslash as escaping
the next character, drops a datagram that ends in a lone backslash, and ignores one of 4096 bytes or
more; the receiver here does the same (tests/helpers/systemd_split.py), so what these tests see is
what PID 1 would act on.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from aqtune.act.notify import NOTIFY_MAX, Notifier, message, socket_address, watchdog_period
from tests.helpers.systemd_split import split_like_systemd

SYSTEMD_BUFFER = 4096  # NOTIFY_BUFFER_MAX


class Receiver:
    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name  # what NOTIFY_SOCKET holds

    def assignments(self) -> list[str]:
        """One datagram, split as systemd splits it."""
        data = self.sock.recv(SYSTEMD_BUFFER + 1)
        assert len(data) < SYSTEMD_BUFFER, f"systemd would ignore a {len(data)}-byte notification"
        assignments = split_like_systemd(data.decode("utf-8"))  # strict: systemd drops STATUS that is not UTF-8
        assert assignments is not None, f"systemd would drop {data!r}"
        return assignments

    def empty(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(SYSTEMD_BUFFER)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5)
        return False


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Receiver]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(5)
    if request.param == "path":
        name = str(tmp_path / "notify")
        sock.bind(name)
    else:
        abstract = f"aqtune-test-notify-{os.getpid()}-{id(sock)}"
        sock.bind("\0" + abstract)
        name = "@" + abstract
    yield Receiver(sock, name)
    sock.close()


def notifier(receiver: Receiver, **extra: str) -> Notifier:
    return Notifier({"NOTIFY_SOCKET": receiver.name, **extra})


def test_status_with_a_hostile_socket_name_arrives_as_one_line(receiver: Receiver) -> None:
    # Finding 1: this name in STATUS= set a 1 us watchdog and systemd killed aqtune, forever.
    sender = notifier(receiver)
    assert sender.send("STATUS=worst fill 3.00 (@x\nWATCHDOG_USEC=1\nX)")
    assert receiver.assignments() == ["STATUS=worst fill 3.00 (@x\\nWATCHDOG_USEC=1\\nX)"]
    assert sender.failed == 0


def test_several_assignments_in_one_datagram(receiver: Receiver) -> None:
    assert notifier(receiver).notify(READY=1, STATUS="a\rb\x1b[2Kc")
    assert receiver.assignments() == ["READY=1", "STATUS=a\\rb\\x1b[2Kc"]


def test_backslashes_reach_systemd_as_they_are(receiver: Receiver) -> None:
    # systemd drops the backslash before each character, and a whole datagram that ends in one.
    sender = notifier(receiver)
    assert sender.notify(STATUS="C:\\dir\\", READY=1)
    assert receiver.assignments() == ["STATUS=C:\\dir\\", "READY=1"]
    assert sender.send("STATUS=\\x1b is not ESC, \x1b is")
    assert receiver.assignments() == ["STATUS=\\x1b is not ESC, \\x1b is"]


def test_names_above_latin1_are_sent_as_utf8(receiver: Receiver) -> None:
    # The sdnotify package encoded Latin-1 and swallowed the error: every later STATUS was lost.
    sender = notifier(receiver)
    assert sender.send("STATUS=worst fill 1.00 (@сокет-名前-\U0001f600)")
    assert receiver.assignments() == ["STATUS=worst fill 1.00 (@сокет-名前-\U0001f600)"]


def test_lone_surrogates_and_bidi_overrides_cannot_break_the_encoding(receiver: Receiver) -> None:
    assert notifier(receiver).send("STATUS=\udcff\u202e")
    assert receiver.assignments() == ["STATUS=\\udcff\\u202e"]


def test_a_long_value_is_clipped_to_what_systemd_accepts(receiver: Receiver) -> None:
    sender = notifier(receiver)
    assert sender.notify(READY=1, STATUS="名" * 5000)
    ready, status = receiver.assignments()
    assert ready == "READY=1"
    assert status.startswith("STATUS=名名") and status.endswith("...")


def test_message_is_bounded_whatever_the_values() -> None:
    data = message({"STATUS": "\x1b" * 10_000, "READY": "1", "X_AQTUNE": "\U0001f600" * 3000})
    assert len(data) <= NOTIFY_MAX
    data.decode("utf-8")


def test_keys_are_checked() -> None:
    with pytest.raises(ValueError, match="variable name"):
        message({"STATUS\nWATCHDOG_USEC": "1"})
    with pytest.raises(ValueError, match="assignment"):
        Notifier({}).send("READY")


def test_a_full_receiver_neither_blocks_nor_raises_and_the_message_goes_out_later(receiver: Receiver) -> None:
    sender = notifier(receiver)
    outcomes: list[bool] = []

    def flood() -> None:
        # Bounded: the receive queue of an unread datagram socket fills after a few hundred at most.
        for index in range(5000):
            ok = sender.send(f"STATUS=message {index}")
            outcomes.append(ok)
            if not ok:
                return

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "a send blocked on a full receiver"
    assert outcomes and outcomes[-1] is False, "the receiver's queue never filled"
    assert sender.failed == 1 and sender.last_error and receiver.name in sender.last_error
    assert sender.pending == {"STATUS": f"message {len(outcomes) - 1}"}
    while not receiver.empty():
        pass
    assert sender.send("READY=1")
    # The status that did not go out is sent with the next message.
    assert sorted(receiver.assignments()) == ["READY=1", f"STATUS=message {len(outcomes) - 1}"]
    assert sender.pending == {}


def test_a_missing_socket_is_counted_not_raised(tmp_path: Path) -> None:
    sender = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert sender.enabled
    assert not sender.send("READY=1")
    assert sender.failed == 1 and "gone" in (sender.last_error or "")


def test_without_notify_socket_nothing_is_sent() -> None:
    sender = Notifier({})
    assert not sender.enabled and not sender.send("READY=1") and sender.failed == 0
    relative = Notifier({"NOTIFY_SOCKET": "relative/socket"})
    assert not relative.enabled and relative.last_error and "absolute" in relative.last_error


def test_socket_addresses() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abstract") == b"\0abstract"
    assert socket_address("") is None and socket_address("@") is None and socket_address("x") is None


@pytest.mark.parametrize(("environ", "period"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "1"}, 0.5e-6),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "lots"}, None),
    ({}, None),
    ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1234"}, 2.0),
    ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "999"}, None),  # another process's watchdog
])
def test_watchdog_period(environ: dict[str, str], period: float | None) -> None:
    assert watchdog_period(environ, 1234) == period


def test_watchdog_pings_every_half_period(receiver: Receiver) -> None:
    sender = notifier(receiver, WATCHDOG_USEC="4000000")
    assert sender.until_due(100.0) == 0.0
    sender.watchdog(100.0)
    assert receiver.assignments() == ["WATCHDOG=1"]
    assert sender.until_due(101.0) == 1.0
    sender.watchdog(101.0)  # not due: nothing sent
    assert receiver.empty()
    sender.watchdog(102.0)
    assert receiver.assignments() == ["WATCHDOG=1"]


def test_a_failed_ping_is_retried_soon_without_spinning(tmp_path: Path) -> None:
    sender = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone"), "WATCHDOG_USEC": "4000000"})
    sender.watchdog(100.0)
    assert sender.failed == 1
    assert 0 < sender.until_due(100.0) <= 0.25
    assert Notifier({}).until_due(0.0) == float("inf")


def test_the_receiver_reads_as_systemd_does() -> None:
    # What made finding 1: a raw newline is a new assignment; and a trailing backslash voids it all.
    assert split_like_systemd("STATUS=(@x\nWATCHDOG_USEC=1\nX)") == ["STATUS=(@x", "WATCHDOG_USEC=1", "X)"]
    assert split_like_systemd("READY=1\r\nSTATUS=a\\nb") == ["READY=1", "STATUS=anb"]
    assert split_like_systemd("READY=1\nSTATUS=a\\") is None

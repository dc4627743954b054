"""Connection dumps (established TCP with tcp_info, connected Unix sockets) against bytes captured from a
real kernel, with the figures the capturing script read from the very sockets (see
tests/fixtures/capture_connections.py)."""

from __future__ import annotations

import json
import socket
import struct
from functools import cache
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aqtune.collect.sockdiag import (
    BC_OP,
    INET_DIAG_BC_JMP,
    INET_DIAG_BC_S_EQ,
    ConnectionDump,
    UnixDump,
    decode_inet_connections,
    decode_tcp_info,
    decode_unix_sockets,
    inet_connections_request,
    port_filter,
    unix_connections_request,
)
from aqtune.records import Connection
from tests.unit.fixture_data import FIXTURES, chunks, split_messages


@cache
def expected() -> dict[str, Any]:
    return dict(json.loads((FIXTURES / "conn_expected.json").read_text()))


def tcp_rows(name: str) -> list[Connection]:
    progress = ConnectionDump("capture")
    for part in chunks(name):
        decode_inet_connections(progress, part, len(part))
    assert progress.done and progress.skipped == 0
    return progress.rows


def named(name: str) -> dict[str, Any]:
    return next(row for row in expected()["tcp"] if row["name"] == name)


def server_side(rows: list[Connection], name: str) -> Connection:
    row = named(name)
    return next(c for c in rows if c.local == row["local"] and c.peer == row["peer"])


# --- requests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fixture", "family", "ports"), [
    ("conn_inet4", socket.AF_INET, None),
    ("conn_inet4_port", socket.AF_INET, [19200]),
    ("conn_inet6", socket.AF_INET6, None),
])
def test_inet_request_bytes(fixture: str, family: int, ports: list[int] | None) -> None:
    assert inet_connections_request(family, ports).hex() == expected()["requests"][fixture]


def test_unix_request_bytes() -> None:
    assert unix_connections_request().hex() == expected()["requests"]["conn_unix"]


def test_port_filter_is_the_chain_ss_builds() -> None:
    program = port_filter([80, 443, 80])
    ops = [BC_OP.unpack_from(program, offset) for offset in range(0, len(program), 4)]
    assert ops == [
        (INET_DIAG_BC_S_EQ, 8, 12), (0, 0, 80), (INET_DIAG_BC_JMP, 4, 12),  # match 80: jump past the test for 443
        (INET_DIAG_BC_S_EQ, 8, 12), (0, 0, 443),  # the last test's "no" lands 4 bytes past the end: reject
    ]


@given(st.lists(st.integers(0, 65535), min_size=1, max_size=20))
def test_port_filter_accepts_exactly_its_ports(ports: list[int]) -> None:
    program = port_filter(ports)
    for port in {*ports, 0, 1, 65535}:
        assert run_bytecode(program, port) == (port in ports)


def run_bytecode(program: bytes, sport: int) -> bool:
    """The kernel's inet_diag_bc_run for the ops port_filter uses."""
    offset, length = 0, len(program)
    while length > 0:
        code, yes, no = BC_OP.unpack_from(program, offset)
        if code == INET_DIAG_BC_S_EQ:
            matched = BC_OP.unpack_from(program, offset + 4)[2] == sport
        elif code == INET_DIAG_BC_JMP:
            matched = False
        else:
            raise AssertionError(f"unexpected op {code}")
        step = yes if matched else no
        offset += step
        length -= step
    return length == 0


def test_too_many_ports_ask_for_every_connection() -> None:
    assert inet_connections_request(socket.AF_INET, range(1000)) == inet_connections_request(socket.AF_INET)


# --- TCP connections -----------------------------------------------------------------------------------


def test_tcp_info_from_getsockopt_decodes() -> None:
    for row in expected()["tcp"]:
        if row["inode"] == 0:
            continue
        info = decode_tcp_info(bytes.fromhex(row["tcp_info"]))
        assert info is not None
        assert (info.bytes_acked, info.bytes_received) == (row["bytes_acked"], row["bytes_received"])
        assert info.state in (1, 8)


def test_tcp_info_too_short_for_times_is_none_and_without_byte_counts_has_times() -> None:
    raw = bytes.fromhex(named("talked")["tcp_info"])
    assert decode_tcp_info(raw[:59]) is None
    old_kernel = decode_tcp_info(raw[:104])  # struct tcp_info as Linux 3.x had it
    assert old_kernel is not None and old_kernel.bytes_acked is None and old_kernel.bytes_received is None
    assert old_kernel.last_data_sent_ms == decode_tcp_info(raw).last_data_sent_ms  # type: ignore[union-attr]


def test_established_connections_with_their_figures() -> None:
    rows = tcp_rows("conn_inet4")
    for name in ("silent", "talked", "closed", "other-port"):
        row = named(name)
        found = server_side(rows, name)
        assert (found.inode, found.proto, found.netns) == (row["inode"], "tcp", "capture")
        assert (found.bytes_in, found.bytes_out) == (row["bytes_received"], row["bytes_acked"])
        assert found.recv_idle is not None and found.send_idle is not None
    assert server_side(rows, "closed").state == "close-wait"
    assert server_side(rows, "silent").state == "established"
    # The server never sent on "silent": its send clock runs from the handshake, past the receive one.
    silent = server_side(rows, "silent")
    assert silent.send_idle is not None and silent.recv_idle is not None and silent.send_idle >= silent.recv_idle
    talked = server_side(rows, "talked")
    assert talked.send_idle is not None and talked.send_idle <= silent.send_idle  # it answered after the handshake


def test_a_connection_not_yet_accepted_has_no_inode() -> None:
    queued = server_side(tcp_rows("conn_inet4"), "queued")
    assert queued.inode == 0 and queued.queued
    assert queued.min_age is not None and queued.min_age >= 0.3  # it waited through the capture's pause


def test_the_port_filter_leaves_only_that_ports_connections() -> None:
    rows = tcp_rows("conn_inet4_port")
    assert {c.local for c in rows} == {"127.0.0.1:19200"}
    assert {c.peer for c in rows} == {named(n)["peer"] for n in ("silent", "talked", "closed", "queued")}


def test_ipv6_connections_are_bracketed() -> None:
    row = named("v6")
    found = server_side(tcp_rows("conn_inet6"), "v6")
    assert found.proto == "tcp6" and found.local == row["local"] == "[::1]:19202"
    assert found.inode == row["inode"]


def test_connection_message_with_a_broken_attribute_is_skipped() -> None:
    (first, *_rest) = split_messages(chunks("conn_inet4_port")[0])
    broken = bytearray(first)
    struct.pack_into("=H", broken, 16 + 72, 0xFFF0)  # the first attribute claims more than the message
    progress = ConnectionDump("capture")
    decode_inet_connections(progress, bytes(broken), len(broken))
    assert progress.rows == [] and progress.skipped == 1


@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    for progress, decoder in ((ConnectionDump("x"), decode_inet_connections), (UnixDump("x"), decode_unix_sockets)):
        try:
            decoder(progress, data, len(data))  # type: ignore[operator]
        except Exception as exc:  # NetlinkError is the only allowed one: an error reply's errno
            assert type(exc).__name__ == "NetlinkError", exc


# --- Unix ----------------------------------------------------------------------------------------------


def test_unix_sockets_with_names_files_and_peers() -> None:
    progress = UnixDump("capture")
    for part in chunks("conn_unix"):
        decode_unix_sockets(progress, part, len(part))
    assert progress.done and progress.skipped == 0
    by_peer = {s.peer: s for s in progress.rows if not s.listening}
    listeners = {s.name: s for s in progress.rows if s.listening}
    for row in expected()["unix"]:
        if row["role"] == "listener":
            assert listeners[row["name"]].inode == row["inode"]
            continue
        if row["role"] == "queued":
            # Not yet accepted, the server's end is no socket the dump lists: the listener's queue counts it.
            assert row["peer"] not in by_peer
            continue
        found = by_peer[row["peer"]]
        assert (found.inode, found.name) == (row["inode"], row["name"])
        listener = listeners[row["name"]]
        # An accepted socket carries its listener's file: how it is told from one on a path bound again.
        assert found.vfs == listener.vfs
        assert (found.vfs is None) == row["name"].startswith("@")
    assert len(by_peer) == sum(row["role"] == "accepted" for row in expected()["unix"])

"""Matching connections to their listeners and summarizing them: pure functions on hand-built records."""

from __future__ import annotations

from aqtune.collect.connections import (
    AGES_EBPF,
    match_tcp,
    match_unix,
    summarize_connections,
    with_group_members,
    worst_first,
)
from aqtune.collect.sockdiag import UnixSocket
from aqtune.records import Connection, Listener, Process

NOW = 1_000_000.0


def listener(address: str, cookie: int, proto: str = "tcp", netns: str = "web") -> Listener:
    port = None if proto == "unix" else int(address.rpartition(":")[2])
    return Listener(netns, proto, address, port, 0, 8, 0, cookie, cookie + 1000, 0)


def conn(local: str, peer: str = "127.0.0.1:40000", proto: str = "tcp", netns: str = "web", inode: int = 1,
         recv_idle: float | None = 0.0, send_idle: float | None = 0.0, accepted_at: float | None = None,
         bytes_out: int | None = 0, pids: tuple[int, ...] = ()) -> Connection:
    holders = tuple(Process(pid, "worker", "worker", None) for pid in pids)
    return Connection(netns, proto, local, peer, "established", inode, inode + 7, 0, recv_idle=recv_idle,
                      send_idle=send_idle, bytes_in=10, bytes_out=bytes_out, accepted_at=accepted_at, holders=holders)


def test_exact_address_wins_over_the_wildcard_on_the_same_port() -> None:
    specific, wildcard = listener("127.0.0.1:80", 1), listener("0.0.0.0:80", 2)
    to_specific, to_other = conn("127.0.0.1:80", inode=10), conn("10.0.0.1:80", inode=11)
    found = match_tcp([specific, wildcard], [to_specific, to_other])
    assert found == {("web", 1): [to_specific], ("web", 2): [to_other]}


def test_protocol_port_and_namespace_must_match() -> None:
    v4, v6 = listener("0.0.0.0:80", 1), listener("[::]:80", 2, proto="tcp6")
    other_ns = listener("0.0.0.0:80", 3, netns="db")
    mapped = conn("[::ffff:127.0.0.1]:80", "[::ffff:127.0.0.1]:5000", proto="tcp6", inode=20)
    client_side = conn("127.0.0.1:40000", "127.0.0.1:80", inode=21)  # the client's end: port 40000
    found = match_tcp([v4, v6, other_ns], [mapped, client_side, conn("127.0.0.1:80", netns="db", inode=22)])
    assert found[("web", 2)] == [mapped]
    assert ("web", 1) not in found
    assert [c.inode for c in found[("db", 3)]] == [22]


def test_a_reuseport_group_shares_its_connections() -> None:
    a, b = listener("127.0.0.1:8080", 1), listener("127.0.0.1:8080", 2)
    c = conn("127.0.0.1:8080")
    assert match_tcp([a, b], [c]) == {("web", 1): [c], ("web", 2): [c]}
    assert {x.cookie for x in with_group_members([a], [a, b, listener("127.0.0.1:9090", 3)])} == {1, 2}


def test_device_bound_listener_matches_its_address() -> None:
    bound = listener("127.0.0.1%lo:80", 1)
    c = conn("127.0.0.1:80")
    assert match_tcp([bound], [c]) == {("web", 1): [c]}


def test_unix_connections_follow_name_and_file() -> None:
    old, new = listener("/run/app.sock", 1, proto="unix"), listener("/run/app.sock", 2, proto="unix")
    sockets = [
        UnixSocket(old.inode, 1, True, "/run/app.sock", (100, 1), 0, 0, 8, 0),
        UnixSocket(new.inode, 2, True, "/run/app.sock", (200, 1), 0, 0, 8, 0),  # bound again: a new file
        UnixSocket(50, 9, False, "/run/app.sock", (100, 1), 51, 0, 0, 33),
        UnixSocket(60, 10, False, "/run/app.sock", (200, 1), 61, 3, 0, 33),
        UnixSocket(70, 11, False, "/run/other.sock", (300, 1), 71, 0, 0, 33),  # no listener asked for
    ]
    found = match_unix("web", [old, new], sockets)
    assert [c.inode for c in found[("web", 1)]] == [50]
    (accepted,) = found[("web", 2)]
    assert (accepted.inode, accepted.peer, accepted.peer_inode, accepted.rqueue) == (60, "socket:[61]", 61, 3)
    assert accepted.recv_idle is None and accepted.proto == "unix"


def test_summary_counts_long_idle_and_queued() -> None:
    conns = [
        conn("x:1", inode=1, accepted_at=NOW - 100, recv_idle=100, send_idle=100, pids=(11,)),  # long, silent
        conn("x:1", inode=2, accepted_at=NOW - 5, recv_idle=4, send_idle=1, bytes_out=300, pids=(12,)),  # young
        conn("x:1", inode=3, accepted_at=None, recv_idle=20, send_idle=15, bytes_out=300, pids=(13,)),  # idle, answered
        conn("x:1", inode=0, recv_idle=3, send_idle=3),  # queued for 3 s
    ]
    summary = summarize_connections(conns, NOW, long_after=30, idle_after=10, ages=AGES_EBPF, keep=2)
    assert (summary.accepted, summary.queued, summary.long_held, summary.idle, summary.held) == (3, 1, 1, 2, 2)
    assert summary.answered == 1  # inode 3: the server answered after the client's last data
    assert summary.held_by == (11, 13) and summary.busy == (11, 12, 13)
    assert summary.oldest == 100 and summary.oldest_queued == 3
    assert [c.inode for c in summary.top] == [1, 3] and summary.more == 2


def test_without_ebpf_tcp_info_proves_a_lower_bound_on_age() -> None:
    # Never answered: the send clock runs from the handshake, so 40 s is proven without eBPF.
    silent = conn("x:1", inode=1, recv_idle=5, send_idle=40)
    summary = summarize_connections([silent], NOW, long_after=30, idle_after=10)
    assert (summary.long_held, summary.idle, summary.oldest) == (1, 0, 40)
    assert silent.age(NOW) is None and silent.min_age == 40


def test_unix_connections_without_times_are_neither_long_nor_idle_unless_aged() -> None:
    plain = Connection("web", "unix", "/s", "socket:[2]", "established", 1, 1, 0)
    aged = Connection("web", "unix", "/s", "socket:[4]", "established", 3, 3, 0, accepted_at=NOW - 60)
    summary = summarize_connections([plain, aged], NOW, long_after=30, idle_after=10, ages=AGES_EBPF)
    assert (summary.long_held, summary.idle, summary.oldest) == (1, 0, 60)
    assert [c.inode for c in worst_first([plain, aged], NOW, 30, 10)] == [3, 1]


def test_empty_summary() -> None:
    summary = summarize_connections([], NOW, 30, 10)
    assert (summary.accepted, summary.oldest, summary.top, summary.more) == (0, None, (), 0)

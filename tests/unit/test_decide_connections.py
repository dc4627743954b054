"""held-by-connections and reuseport-stalled on hand-built listeners and summaries; the [connections] policy."""

from __future__ import annotations

import pytest

from aqtune.collect.connections import summarize_connections
from aqtune.decide import servers
from aqtune.decide.connections import held_by_connections, reuseport_stalled
from aqtune.decide.findings import SPECS, FindingId, Role
from aqtune.decide.policy import Policy, PolicyError, parse
from aqtune.model.groups import group_json, reuseport_groups
from aqtune.records import Connection, ConnectionSummary, Listener, Process

NOW = 2_000_000.0
POLICY = Policy()


def proc(pid: int, comm: str, exe: str, ppid: int = 1, threads: int = 1) -> Process:
    return Process(pid, comm, comm, None, exe=exe, ppid=ppid, threads=threads, starttime=pid)


def apache(children: int, threads: int = 1) -> tuple[Process, ...]:
    return (proc(100, "apache2", "apache2", threads=1),
            *(proc(101 + i, "apache2", "apache2", ppid=100, threads=threads) for i in range(children)))


def listener(processes: tuple[Process, ...], queue: int = 3, backlog: int = 2, cookie: int = 1,
             address: str = "127.0.0.1:8080", proto: str = "tcp") -> Listener:
    return Listener("web", proto, address, 8080, queue, backlog, 0, cookie, cookie + 50, 0, processes)


def held(pid: int, inode: int, age: float | None = 60.0, recv_idle: float = 55.0) -> Connection:
    return Connection("web", "tcp", "127.0.0.1:8080", f"127.0.0.1:{40000 + inode}", "established", inode, inode, 0,
                      recv_idle=recv_idle, send_idle=age or recv_idle, bytes_in=20, bytes_out=0,
                      accepted_at=None if age is None else NOW - age,
                      holders=(proc(pid, "apache2", "apache2", ppid=100),))


def summary(connections: list[Connection], ages: str = "ebpf") -> ConnectionSummary:
    return summarize_connections(connections, NOW, POLICY.connections.long_after, POLICY.connections.idle_after,
                                 ages=ages)


def test_both_findings_are_problems_in_the_table() -> None:
    for finding in (FindingId.HELD_BY_CONNECTIONS, FindingId.REUSEPORT_STALLED):
        assert SPECS[finding].role is Role.PROBLEM and SPECS[finding].subject == "listener"


def test_every_prefork_worker_held_names_apaches_hold_knobs() -> None:
    processes = apache(4)
    found = held_by_connections(listener(processes), summary([held(101 + i, 10 + i) for i in range(4)]),
                                servers.identify(processes), POLICY)
    assert found is not None and found.id is FindingId.HELD_BY_CONNECTIONS
    for knob in ("RequestReadTimeout", "KeepAliveTimeout", "MaxRequestWorkers", "event MPM"):
        assert knob in found.text, found.text
    assert "all 4 of Apache (prefork MPM)'s workers" in found.text
    assert found.evidence["occupied"] == found.evidence["workers"] == 4
    assert found.evidence["long_held"] == 4 and found.evidence["ages"] == "ebpf"
    assert "lower bounds" not in found.text


def test_a_free_worker_means_no_finding() -> None:
    # Three held, one worker serving young connections: a burst or busy workers, not held ones.
    processes = apache(4)
    young = held(104, 20, age=1.0, recv_idle=0.5)
    found = held_by_connections(listener(processes), summary([*(held(101 + i, 10 + i) for i in range(3)), young]),
                                servers.identify(processes), POLICY)
    assert found is None


def test_idle_keep_alive_connections_hold_workers_too() -> None:
    processes = apache(2)
    keepalive = [Connection("web", "tcp", "127.0.0.1:8080", "127.0.0.1:5000", "established", 10 + i, 1, 0,
                            recv_idle=12, send_idle=11, bytes_in=80, bytes_out=500, accepted_at=NOW - 13,
                            holders=(proc(101 + i, "apache2", "apache2", ppid=100),)) for i in range(2)]
    found = held_by_connections(listener(processes), summary(keepalive), servers.identify(processes), POLICY)
    assert found is not None
    assert found.evidence["idle"] == 2 and found.evidence["long_held"] == 0 and found.evidence["answered"] == 2
    assert "2 of them idle keep-alive" in found.text


def test_without_holders_the_held_connections_are_counted_against_the_workers() -> None:
    processes = apache(2)
    anonymous = [Connection("web", "tcp", "127.0.0.1:8080", "x", "established", 10 + i, 1, 0, recv_idle=40,
                            send_idle=40, accepted_at=None) for i in range(3)]
    found = held_by_connections(listener(processes), summary(anonymous, ages="none"), servers.identify(processes),
                                POLICY)
    assert found is not None and "lower bounds from tcp_info" in found.text


@pytest.mark.parametrize("processes", [
    apache(2, threads=26),  # the event MPM: threads serve connections, capacity is configuration
    (proc(200, "nginx", "nginx"), proc(201, "nginx", "nginx", ppid=200)),
])
def test_servers_whose_capacity_is_not_their_worker_count_get_no_finding(processes: tuple[Process, ...]) -> None:
    connections = [held(p.pid, 10 + i) for i, p in enumerate(processes)]
    assert held_by_connections(listener(processes), summary(connections), servers.identify(processes), POLICY) is None


def test_php_fpm_names_its_own_knobs() -> None:
    processes = (proc(300, "php-fpm8.2", "php-fpm8.2"), proc(301, "php-fpm8.2", "php-fpm8.2", ppid=300))
    found = held_by_connections(listener(processes), summary([held(301, 10)]), servers.identify(processes), POLICY)
    assert found is not None
    assert "request_terminate_timeout" in found.text and "pm.max_children" in found.text


# --- reuseport -----------------------------------------------------------------------------------------


def nginx_group(full: int = 65, other: int = 0) -> tuple[Listener, Listener]:
    master = proc(200, "nginx", "nginx")
    one, two = proc(201, "nginx", "nginx", ppid=200), proc(202, "nginx", "nginx", ppid=200)
    return (Listener("web", "tcp", "127.0.0.1:8080", 8080, full, 64, 0, 1, 51, 0, (master, one)),
            Listener("web", "tcp", "127.0.0.1:8080", 8080, other, 64, 0, 2, 52, 0, (master, two)))


def test_groups_are_tcp_sockets_on_one_address() -> None:
    stuck, draining = nginx_group()
    single = Listener("web", "tcp", "127.0.0.1:9090", 9090, 0, 8, 0, 3, 53, 0)
    rebound = [Listener("web", "unix", "/s", None, 0, 8, None, 4 + i, 54 + i, 0) for i in range(2)]
    groups = reuseport_groups([stuck, draining, single, *rebound])
    assert list(groups) == [("web", "tcp", "127.0.0.1:8080")]
    assert group_json(stuck, groups) == {"address": "127.0.0.1:8080", "members": 2}
    assert group_json(single, groups) is None


def test_the_full_socket_names_the_worker_only_it_has() -> None:
    stuck, draining = nginx_group()
    found = reuseport_stalled(stuck, [stuck, draining], POLICY)
    assert found is not None and found.id is FindingId.REUSEPORT_STALLED
    assert "pid 201 (nginx)" in found.text and "pid 200" not in found.text and "pid 202" not in found.text
    assert found.evidence["pids"] == "201"
    assert reuseport_stalled(draining, [stuck, draining], POLICY) is None


def test_all_full_is_not_one_stalled_socket() -> None:
    stuck, other = nginx_group(full=65, other=65)
    assert reuseport_stalled(stuck, [stuck, other], POLICY) is None


def test_one_process_holding_every_member_is_named_as_such() -> None:
    lone = (proc(400, "envoy", "envoy", threads=8),)
    a = Listener("web", "tcp", "127.0.0.1:8080", 8080, 65, 64, 0, 1, 51, 0, lone)
    b = Listener("web", "tcp", "127.0.0.1:8080", 8080, 0, 64, 0, 2, 52, 0, lone)
    found = reuseport_stalled(a, [a, b], POLICY)
    assert found is not None and "pid 400 (envoy), which serve its siblings too" in found.text


def test_where_every_worker_holds_every_socket_the_epoll_sets_tell_who_serves_which() -> None:
    # nginx 1.22: each worker inherits both sockets, and watches only its own.
    master = proc(200, "nginx", "nginx")
    one, two = proc(201, "nginx", "nginx", ppid=200), proc(202, "nginx", "nginx", ppid=200)
    a = Listener("web", "tcp", "127.0.0.1:8080", 8080, 65, 64, 0, 1, 51, 0, (master, one, two))
    b = Listener("web", "tcp", "127.0.0.1:8080", 8080, 0, 64, 0, 2, 52, 0, (master, one, two))
    blind = reuseport_stalled(a, [a, b], POLICY)
    assert blind is not None and "serve its siblings too" in blind.text
    found = reuseport_stalled(a, [a, b], POLICY, serving={51: {202}, 52: {201}})
    assert found is not None and found.evidence["pids"] == "202"
    assert "pid 202 (nginx)" in found.text and "pid 201" not in found.text and "pid 200" not in found.text


# --- policy --------------------------------------------------------------------------------------------


def test_connections_policy_defaults_and_values() -> None:
    assert (Policy().connections.long_after, Policy().connections.idle_after) == (30.0, 10.0)
    policy = parse("[connections]\nlong_after = 5\nidle_after = 2.5\n")
    assert (policy.connections.long_after, policy.connections.idle_after) == (5.0, 2.5)


@pytest.mark.parametrize("text", ["[connections]\nlong_after = 0\n", "[connections]\nidle_after = \"soon\"\n",
                                  "[connections]\nheld_after = 3\n"])
def test_bad_connections_policy_is_refused_with_its_line(text: str) -> None:
    with pytest.raises(PolicyError) as raised:
        parse(text, "p.toml")
    assert raised.value.problems[0].line == 2 and "connections." in raised.value.problems[0].key


def test_status_document_shows_the_group_each_socket_is_in() -> None:
    from aqtune.decide.assess import Assessment
    from aqtune.records import Snapshot
    from aqtune.surfaces.status import snapshot_json

    stuck, draining = nginx_group()
    single = Listener("web", "tcp", "127.0.0.1:9090", 9090, 0, 8, 0, 3, 53, 0)
    document = snapshot_json(Snapshot(NOW, 0.01, [], [stuck, draining, single]), Assessment())
    rows = {row["cookie"]: row for row in document["listeners"]}
    assert rows[1]["group"] == rows[2]["group"] == {"address": "127.0.0.1:8080", "members": 2}
    assert rows[3]["group"] is None
    assert rows[1]["inode"] != rows[2]["inode"]  # each socket keeps its own row and identity

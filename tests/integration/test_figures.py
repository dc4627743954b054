"""aqtune's figures for flooded listeners equal ss's and nstat's, read in the same namespace at the same moment."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from aqtune.collect.sweep import sweep
from aqtune.records import SYSCTLS
from tests.helpers.namespace import TestNamespace
from tests.integration.expect import (
    assert_counters_between,
    assert_matches_ss,
    flood_target,
    listeners_in,
    namespace_in,
    wait_for_queues,
)

pytestmark = pytest.mark.integration

OVERFLOW = 7  # connections beyond what each queue can hold


def test_full_queues_equal_ss_and_nstat(netns: Callable[[], TestNamespace]) -> None:
    ns = netns()
    helper = ns.listen(
        "tcp4:4",
        "tcp6:8",
        f"unix:3:{ns.unix_path('stream.sock')}",
        f"abstract:2:{ns.name}-abstract",
        f"seqpacket:2:{ns.unix_path('seq.sock')}",
    )
    announced = {listener["address"]: listener for listener in helper.ready()["listeners"]}
    # sk_acceptq_is_full() is ack_backlog > max, so a queue holds backlog + 1.
    capacity = {address: listener["requested_backlog"] + 1 for address, listener in announced.items()}
    flood = ns.flood([(flood_target(listener), capacity[address] + OVERFLOW)
                      for address, listener in announced.items()])
    for report, (address, listener) in zip(flood.ready()["targets"], announced.items(), strict=True):
        if listener["proto"] == "unix":
            # A full Unix listener refuses a non-blocking connect at once; nothing is dropped.
            assert report.get("connected") == capacity[address] and report.get("eagain") == OVERFLOW, report
        else:
            assert report.get("in_progress") == capacity[address] + OVERFLOW, report
    tcp = [address for address, listener in announced.items() if listener["proto"] != "unix"]
    wait_for_queues(ns, capacity, min_drops={address: OVERFLOW for address in tcp})

    ss_before, nstat_before = ns.ss_all(), ns.nstat()
    snapshot = sweep(ns.name)
    ss_after, nstat_after = ns.ss_all(), ns.nstat()

    ours = listeners_in(snapshot, ns.name)
    assert set(ours) == set(announced) == set(ss_before) == set(ss_after)
    assert {listener.netns for listener in snapshot.listeners} == {ns.name}
    for address, listener in ours.items():
        assert_matches_ss(listener, ss_before[address], ss_after[address])
        expected = announced[address]
        assert listener.proto == expected["proto"]
        assert listener.port == expected["port"]
        assert listener.queue == capacity[address]
        assert listener.backlog == expected["requested_backlog"]
        assert listener.inode == expected["inode"]
        assert listener.cookie == expected["cookie"]  # SO_COOKIE, for Unix sockets too
        assert listener.uid == 0
        assert listener.fill == pytest.approx(capacity[address] / expected["requested_backlog"])
        if listener.proto == "unix":
            assert listener.drops == 0
        else:
            assert listener.drops is not None and listener.drops >= OVERFLOW

    namespace = namespace_in(snapshot, ns.name)
    assert [n.name for n in snapshot.namespaces] == [ns.name]
    assert namespace.inode == ns.inode
    assert namespace.error is None
    assert namespace.skipped_messages == 0
    assert namespace.listeners == len(announced)
    assert_counters_between(namespace, nstat_before, nstat_after)
    # Two TCP listeners each turned away OVERFLOW SYNs; retransmits only add to that.
    assert namespace.counters["ListenOverflows"] >= 2 * OVERFLOW
    assert namespace.counters["ListenDrops"] >= 2 * OVERFLOW


def test_every_listener_of_a_crowded_namespace_is_reported(netns: Callable[[], TestNamespace]) -> None:
    # Enough listeners that each dump spans many recv() chunks, so chunk boundaries are crossed.
    per_kind = 300
    ns = netns()
    specs = [spec for index in range(per_kind) for spec in (
        f"tcp4:{index % 50 + 1}", f"tcp6:{index % 40 + 1}", f"abstract:{index % 30 + 1}:{ns.name}-{index}")]
    helper = ns.listen(*specs)
    announced = {listener["address"]: listener for listener in helper.ready()["listeners"]}
    assert len(announced) == 3 * per_kind

    snapshot = sweep(ns.name)
    ss = ns.ss_all()
    ours = listeners_in(snapshot, ns.name)
    assert namespace_in(snapshot, ns.name).skipped_messages == 0
    assert set(ours) == set(announced) == set(ss)
    for address, listener in ours.items():
        assert_matches_ss(listener, ss[address], ss[address])
        assert (listener.cookie, listener.backlog) == (announced[address]["cookie"],
                                                       announced[address]["requested_backlog"])


def test_sysctls_are_the_namespace_own(netns: Callable[[], TestNamespace]) -> None:
    ns = netns()
    # Values unlike the defaults a new namespace starts with, so a host or default read cannot pass.
    chosen = {
        "net.core.somaxconn": 64,
        "net.ipv4.tcp_max_syn_backlog": 96,
        "net.ipv4.tcp_syncookies": 2,
        "net.ipv4.tcp_abort_on_overflow": 1,
    }
    for name, value in chosen.items():
        ns.set_sysctl(name, value)
    assert ns.sysctls(*SYSCTLS) == chosen

    # With tcp_syncookies=2 every SYN is answered with a cookie, so the cookie counters move too.
    helper = ns.listen("tcp4:4")
    (listener,) = helper.ready()["listeners"]
    ns.flood([(flood_target(listener), 5 + OVERFLOW)])
    wait_for_queues(ns, {listener["address"]: 5}, min_drops={listener["address"]: OVERFLOW})

    nstat_before = ns.nstat()
    snapshot = sweep(ns.name)
    nstat_after = ns.nstat()
    namespace = namespace_in(snapshot, ns.name)
    assert namespace.sysctls == chosen
    assert_counters_between(namespace, nstat_before, nstat_after)
    assert namespace.counters["SyncookiesSent"] >= 5
    assert namespace.counters["TCPReqQFullDoCookies"] >= 5
    host = namespace_in(sweep("host"), "host")
    assert host.sysctls == host_sysctls()


def test_backlog_follows_somaxconn_only_after_relisten(netns: Callable[[], TestNamespace]) -> None:
    ns = netns()
    ns.set_sysctl("net.core.somaxconn", 64)
    helper = ns.listen("tcp4:1000", "tcp6:1000", f"unix:1000:{ns.unix_path('big.sock')}")
    addresses = [listener["address"] for listener in helper.ready()["listeners"]]

    def backlogs() -> dict[str, int]:
        ours = listeners_in(sweep(ns.name), ns.name)
        ss = ns.ss_all()
        assert {address: listener.backlog for address, listener in ours.items()} == {
            address: row.backlog for address, row in ss.items()}
        return {address: ours[address].backlog for address in addresses}

    assert backlogs() == dict.fromkeys(addresses, 64)
    ns.set_sysctl("net.core.somaxconn", 128)
    assert backlogs() == dict.fromkeys(addresses, 64), "somaxconn applies at listen(), not before"
    for index in range(len(addresses)):
        helper.request(f"relisten {index} 1000")
    assert backlogs() == dict.fromkeys(addresses, 128)
    helper.request("relisten 0 7")
    assert backlogs()[addresses[0]] == 7, "a re-listen can shrink the backlog too"


def host_sysctls() -> dict[str, int]:
    values = {}
    for name in SYSCTLS:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            values[name] = int(f.read().split()[0])
    return values

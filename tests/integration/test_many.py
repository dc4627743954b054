"""One sweep over many namespaces attributes every listener and counter to the right one."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from aqtune.collect.sweep import sweep
from tests.helpers.namespace import TestNamespace
from tests.integration.expect import (
    assert_counters_between,
    assert_matches_ss,
    listeners_in,
    namespace_in,
    wait_for_queues,
)

pytestmark = pytest.mark.integration

COUNT = 8
PORT = 18080  # the same address in every namespace: only the namespace tells the listeners apart


def test_one_sweep_sees_every_namespace(netns: Callable[[], TestNamespace]) -> None:
    spaces = [netns() for _ in range(COUNT)]
    # Namespace i: backlog i+1 and i+1 SYNs beyond it, so every namespace's figures differ.
    backlogs = [index + 1 for index in range(COUNT)]
    address = f"127.0.0.1:{PORT}"
    helpers = [ns.listen(f"tcp4:{backlog}:{PORT}", wait=False) for ns, backlog in zip(spaces, backlogs, strict=True)]
    announced = [helper.ready()["listeners"][0] for helper in helpers]
    floods = [ns.flood([(f"tcp:{address}", 2 * backlog + 1)], wait=False)
              for ns, backlog in zip(spaces, backlogs, strict=True)]
    for flood in floods:
        flood.ready()
    for ns, backlog in zip(spaces, backlogs, strict=True):
        wait_for_queues(ns, {address: backlog + 1}, min_drops={address: backlog})

    ss_before = [ns.ss_tcp() for ns in spaces]
    nstat_before = [ns.nstat() for ns in spaces]
    snapshot = sweep("all")
    nstat_after = [ns.nstat() for ns in spaces]
    ss_after = [ns.ss_tcp() for ns in spaces]

    assert namespace_in(snapshot, "host").error is None
    inodes = [ns.inode for ns in spaces]
    assert len(set(inodes)) == COUNT
    for index, ns in enumerate(spaces):
        namespace = namespace_in(snapshot, ns.name)
        assert namespace.inode == inodes[index]
        assert namespace.error is None
        assert namespace.listeners == 1
        # A named namespace is reported once, under its name, not again as its process's pid:N.
        assert [n.name for n in snapshot.namespaces if n.inode == inodes[index]] == [ns.name]
        assert_counters_between(namespace, nstat_before[index], nstat_after[index])
        assert namespace.counters["ListenOverflows"] >= backlogs[index]

        (listener,) = listeners_in(snapshot, ns.name).values()
        assert_matches_ss(listener, ss_before[index][address], ss_after[index][address])
        assert (listener.address, listener.backlog, listener.queue) == (address, backlogs[index], backlogs[index] + 1)
        assert (listener.inode, listener.cookie) == (announced[index]["inode"], announced[index]["cookie"])
        assert [p.pid for p in listener.processes] == [helpers[index].ready()["pid"]]

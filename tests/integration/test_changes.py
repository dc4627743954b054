"""Listeners and namespaces that come and go between (or during) sweeps."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from aqtune.collect import netns as aq_netns
from aqtune.collect.sweep import sweep
from tests.helpers.namespace import TestNamespace, wait_until
from tests.helpers.process import kill_process
from tests.integration.expect import listeners_in, namespace_in

pytestmark = pytest.mark.integration

OWN_NETNS = "/proc/self/ns/net"


def cookies(ns: TestNamespace) -> dict[int, str]:
    """cookie -> address of every listener aqtune sees in ``ns``, checked against ss's addresses."""
    snapshot = sweep(ns.name)
    ours = listeners_in(snapshot, ns.name)
    assert set(ours) == set(ns.ss_all())
    assert namespace_in(snapshot, ns.name).listeners == len(ours)
    return {listener.cookie: address for address, listener in ours.items()}


def test_listeners_appear_and_disappear_between_sweeps(netns: Callable[[], TestNamespace]) -> None:
    ns = netns()
    first = ns.listen("tcp4:4")
    (v4,) = first.ready()["listeners"]
    assert cookies(ns) == {v4["cookie"]: v4["address"]}

    v6 = first.request("open tcp6:8")
    late = first.request(f"open abstract:3:{ns.name}-late")
    assert cookies(ns) == {v4["cookie"]: v4["address"], v6["cookie"]: v6["address"],
                           late["cookie"]: late["address"]}

    first.request(f"close {v4['index']}")
    assert cookies(ns) == {v6["cookie"]: v6["address"], late["cookie"]: late["address"]}

    # The same address on a new socket is a new listener: nothing of the old one may linger.
    again = first.request(f"open tcp4:5:{v4['port']}")
    assert again["address"] == v4["address"] and again["cookie"] != v4["cookie"]
    seen = listeners_in(sweep(ns.name), ns.name)[v4["address"]]
    assert (seen.cookie, seen.inode, seen.backlog) == (again["cookie"], again["inode"], 5)

    # A second process's listener appears with its own owner and goes when the process exits.
    second = ns.listen("tcp4:2")
    (other,) = second.ready()["listeners"]
    owners = listeners_in(sweep(ns.name), ns.name)[other["address"]].processes
    assert [p.pid for p in owners] == [second.ready()["pid"]]
    second.stop()
    assert other["cookie"] not in cookies(ns)

    first.stop()
    assert cookies(ns) == {}
    assert namespace_in(sweep(ns.name), ns.name).error is None, "an empty namespace is still read"


@pytest.fixture
def unnamed_namespaces() -> Iterator[Callable[[float], subprocess.Popen[bytes]]]:
    """Starts ``unshare -n sleep S`` processes, each alone in a namespace without a name; all are killed after."""
    started: list[subprocess.Popen[bytes]] = []

    def start(seconds: float) -> subprocess.Popen[bytes]:
        own = os.readlink(OWN_NETNS)
        process = subprocess.Popen(["unshare", "-n", "sleep", str(seconds)], stdin=subprocess.DEVNULL)
        started.append(process)

        def moved() -> bool:
            try:
                return os.readlink(f"/proc/{process.pid}/ns/net") != own
            except OSError:
                return process.poll() is not None
        wait_until(moved, f"unshare -n (pid {process.pid}) to enter its namespace")
        return process

    yield start
    for process in started:
        kill_process(process)


def test_namespace_whose_only_process_exited_is_reported_not_fatal(
        unnamed_namespaces: Callable[[float], subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    process = unnamed_namespaces(60)
    name = f"pid:{process.pid}"
    inode = os.stat(f"/proc/{process.pid}/ns/net").st_ino
    namespace = namespace_in(sweep(name), name)
    assert (namespace.inode, namespace.error) == (inode, None)
    assert namespace.sysctls and namespace.counters

    # The list a sweep starts from, taken while the process lived; it exits before the namespace is read.
    listed = aq_netns.list_namespaces()
    assert name in [ref.name for ref in listed]
    kill_process(process)
    monkeypatch.setattr(aq_netns, "list_namespaces", lambda *args, **kwargs: listed)
    snapshot = sweep("all")
    gone = namespace_in(snapshot, name)
    assert gone.error is not None and gone.error.startswith("vanished"), gone.error
    assert not [listener for listener in snapshot.listeners if listener.netns == name]
    assert namespace_in(snapshot, "host").error is None, "the other namespaces are still read"

    monkeypatch.undo()
    assert name not in [namespace.name for namespace in sweep("all").namespaces]
    with pytest.raises(LookupError):
        sweep(name)


def test_namespace_deleted_during_a_sweep_is_reported_not_fatal(netns: Callable[[], TestNamespace],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ns = netns()
    helper = ns.listen("tcp4:4")
    (listener,) = helper.ready()["listeners"]
    inode = ns.inode
    listed = aq_netns.list_namespaces()
    ns.delete()
    monkeypatch.setattr(aq_netns, "list_namespaces", lambda *args, **kwargs: listed)
    gone = namespace_in(sweep("all"), ns.name)
    assert gone.error is not None and gone.error.startswith("vanished"), gone.error

    # Without its name the namespace lives on in its process, and so does the listener.
    monkeypatch.undo()
    snapshot = sweep("all")
    assert ns.name not in [namespace.name for namespace in snapshot.namespaces]
    survivor = namespace_in(snapshot, f"pid:{helper.pid}")
    assert survivor.inode == inode
    (seen,) = listeners_in(snapshot, survivor.name).values()
    assert (seen.address, seen.cookie) == (listener["address"], listener["cookie"])


def test_sweeps_survive_namespaces_exiting_meanwhile(
        unnamed_namespaces: Callable[[float], subprocess.Popen[bytes]]) -> None:
    # Staggered exits, so some happen between a sweep's listing and its reads; bounded to ~2 s.
    processes = [unnamed_namespaces(0.1 + 0.1 * index) for index in range(10)]
    deadline = time.monotonic() + 3
    sweeps = 0
    while any(process.poll() is None for process in processes) and time.monotonic() < deadline:
        snapshot = sweep("all")
        sweeps += 1
        errors = [namespace.error for namespace in snapshot.namespaces if namespace.error]
        assert all(error.startswith("vanished") for error in errors), errors
    assert sweeps > 0
    assert all(process.poll() is not None for process in processes)

"""How namespaces are selected and listeners told apart.

It also holds the regression tests for two bugs this suite found: ``pid:N`` selecting only unnamed
namespaces, and listeners bound to different devices sharing one address.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from aqtune.collect.sweep import sweep
from tests.helpers.namespace import TestNamespace
from tests.integration.expect import namespace_in

pytestmark = pytest.mark.integration

PORT = 18443


def test_select_by_name_and_by_inode_give_the_same_namespace(netns: Callable[[], TestNamespace]) -> None:
    ns = netns()
    (listener,) = ns.listen("tcp4:4").ready()["listeners"]
    by_name, by_inode = sweep(ns.name), sweep(str(ns.inode))
    for snapshot in (by_name, by_inode):
        assert [(n.name, n.inode) for n in snapshot.namespaces] == [(ns.name, ns.inode)]
        assert [listener_.cookie for listener_ in snapshot.listeners] == [listener["cookie"]]


@pytest.fixture
def stale_run_netns_file() -> Iterator[str]:
    """A plain file under /run/netns, as a crashed `ip netns add` leaves behind (our aqt- prefix)."""
    name = f"aqt-{os.getpid()}-stale"
    path = f"/run/netns/{name}"
    os.makedirs("/run/netns", exist_ok=True)
    with open(path, "x"):
        pass
    try:
        yield name
    finally:
        os.unlink(path)


def test_a_stale_run_netns_file_is_no_namespace(stale_run_netns_file: str) -> None:
    snapshot = sweep("all", owners=False)
    assert stale_run_netns_file not in [namespace.name for namespace in snapshot.namespaces]
    assert all(namespace.error is None or namespace.error.startswith("vanished") for namespace in snapshot.namespaces)
    with pytest.raises(LookupError):
        sweep(stale_run_netns_file)


def test_select_pid_of_a_process_in_a_named_namespace(netns: Callable[[], TestNamespace]) -> None:
    ns = netns()
    helper = ns.listen("tcp4:4")
    snapshot = sweep(f"pid:{helper.ready()['pid']}")
    assert [(n.name, n.inode) for n in snapshot.namespaces] == [(ns.name, ns.inode)]


def test_listeners_bound_to_different_devices_are_told_apart(netns: Callable[[], TestNamespace]) -> None:
    ns = netns()
    # A veth pair inside the test namespace only gives a second device; no traffic leaves it.
    try:
        ns.run("ip", "link", "add", "aqt0", "type", "veth", "peer", "name", "aqt1")
    except AssertionError as exc:
        pytest.skip(f"no veth devices here: {exc}")
    helper = ns.listen(f"tcp4:4:{PORT}%lo", f"tcp4:5:{PORT}%aqt0")
    announced = {listener["address"] for listener in helper.ready()["listeners"]}
    assert announced == set(ns.ss_tcp())

    snapshot = sweep(ns.name)
    namespace_in(snapshot, ns.name)
    ours = [listener for listener in snapshot.listeners if listener.netns == ns.name]
    assert len(ours) == 2
    assert len({listener.address for listener in ours}) == 2, [listener.address for listener in ours]

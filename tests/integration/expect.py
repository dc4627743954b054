"""Checks shared by the integration tests: aqtune's records against what the kernel tools report."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from aqtune.records import COUNTERS, Listener, Namespace, Snapshot
from tests.helpers.kernelview import SsListener
from tests.helpers.lineproto import HelperProcess, stop_all
from tests.helpers.namespace import TestNamespace, wait_until


def listeners_in(snapshot: Snapshot, netns: str) -> dict[str, Listener]:
    """aqtune's listeners of one namespace, by address (addresses are unique within a namespace here)."""
    found: dict[str, Listener] = {}
    for listener in snapshot.listeners:
        if listener.netns == netns:
            assert listener.address not in found, f"{listener.address} reported twice in {netns}"
            found[listener.address] = listener
    return found


def namespace_in(snapshot: Snapshot, name: str) -> Namespace:
    matches = [namespace for namespace in snapshot.namespaces if namespace.name == name]
    assert len(matches) == 1, f"namespace {name} reported {len(matches)} times: {snapshot.namespaces}"
    return matches[0]


def flood_target(listener: dict[str, Any]) -> str:
    """flood.py's TARGET for a listener as listen.py announced it."""
    kind, address = listener["kind"], listener["address"]
    if kind in ("tcp4", "tcp6"):
        return f"tcp:{address}"
    if kind == "abstract":
        return f"abstract:{address[1:]}"
    return f"{kind}:{address}"


def wait_for_queues(ns: TestNamespace, queues: dict[str, int], min_drops: dict[str, int] | None = None,
                    timeout: float = 5.0) -> dict[str, SsListener]:
    """Poll ``ss`` in ``ns`` until each listed address has the given queue (and at least the given drops)."""
    min_drops = min_drops or {}

    def settled() -> dict[str, SsListener] | None:
        rows = ns.ss_all()
        for address, queue in queues.items():
            row = rows.get(address)
            if row is None or row.queue != queue or (row.drops or 0) < min_drops.get(address, 0):
                return None
        return rows

    return wait_until(settled, f"queues {queues} and drops >= {min_drops} in {ns.name}", timeout=timeout)


def assert_counters_between(namespace: Namespace, before: dict[str, int], after: dict[str, int]) -> None:
    """Each TcpExt counter aqtune read lies between nstat's readings taken just before and just after."""
    assert set(namespace.counters) == set(COUNTERS)
    for name in COUNTERS:
        low, high = before[f"TcpExt{name}"], after[f"TcpExt{name}"]
        assert low <= namespace.counters[name] <= high, f"{namespace.name} {name}: not within nstat's [{low}, {high}]"


def assert_matches_ss(listener: Listener, before: SsListener, after: SsListener) -> None:
    """Every figure ss shows equals aqtune's; drops, which SYN retransmits can still raise, lie between."""
    assert listener.proto == before.proto
    assert listener.address == before.address
    for figure in ("queue", "backlog", "inode"):
        value = getattr(listener, figure)
        assert value == getattr(before, figure) == getattr(after, figure), f"{listener.address} {figure}"
    if before.cookie is not None:
        assert listener.cookie == before.cookie == after.cookie, f"{listener.address} cookie"
    if listener.proto != "unix":  # ss shows no uid for Unix sockets
        assert listener.uid == before.uid, f"{listener.address} uid"
    assert before.drops is not None and after.drops is not None and listener.drops is not None
    assert before.drops <= listener.drops <= after.drops, f"{listener.address} drops"


def draining_listener(ns: TestNamespace, spec: str, period: float = 0.1) -> tuple[HelperProcess, dict[str, Any]]:
    """A listener whose worker accepts (and closes) whatever is queued every ``period`` seconds: it keeps
    up with the load on average, so only bursts larger than its queue overflow it."""
    helper = ns.listen(spec)
    (listener,) = helper.ready()["listeners"]
    helper.request(f"drain {listener['index']} {period}")
    return helper, listener


@contextlib.contextmanager
def bursts(ns: TestNamespace, listener: dict[str, Any], count: int, every: float = 2.0,
           waves: int = 30) -> Iterator[list[HelperProcess]]:
    """Bursts of ``count`` connects at ``listener``, one every ``every`` seconds, at most ``waves`` of them
    (bounded in count and time), from a thread, until the block ends."""
    stop = threading.Event()
    started: list[HelperProcess] = []

    def run() -> None:
        for _ in range(waves):
            if stop.is_set():
                return
            started.append(ns.flood([(flood_target(listener), count)], hold=every + 1.0, wait=False))
            stop.wait(every)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield started
    finally:
        stop.set()
        thread.join()
        stop_all(started)

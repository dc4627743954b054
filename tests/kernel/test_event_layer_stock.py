"""aqtune's own eBPF layer on a stock kernel: the kprobe/fentry paths that this project's VMs lack.

The qemu tier runs these on Debian's 6.1 and 6.12. Neither shows SYN-stage drops to a tracepoint,
and skb:kfree_skb names no listener for ACK-stage drops, so the layer must choose functions:
tcp_conn_request for SYN-stage drops (with the client's address), tcp_v4_syn_recv_sock for
ACK-stage drops. On 6.1 fentry cannot attach to the latter from 6.1.0-54 on (7 arguments, 6.1's
trampolines take 6), so the kprobe fallback must; 6.12 takes fentry there. 6.1 also lacks the
sock:sk_data_ready tracepoint (6.6+): arrivals come from inet_csk_complete_hashdance.
The layer is compiled once per way (in-process, in a child): under TCG one bcc compile takes about a minute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from aqtune.collect.ebpf import EMIT_ALL, Event, EventLayer
from tests.helpers.namespace import TestNamespace, wait_until

pytestmark = pytest.mark.kernel

BACKLOG = 4
CONNECTS = 12
FULL = BACKLOG + 1  # sk_acceptq_is_full() is ack_backlog > max: the queue holds backlog + 1


@pytest.fixture(scope="module", params=["bcc", "child"])
def layer(request: pytest.FixtureRequest) -> Iterator[tuple[EventLayer, list[Event]]]:
    """Compiled in this process (trace's way), then in a child that hands it over (the daemon's way:
    kprobe perf events and fentry links travel as descriptors too)."""
    start = EventLayer.start if request.param == "bcc" else EventLayer.start_in_child
    with start(emit=EMIT_ALL) as loaded:
        events: list[Event] = []
        loaded.on_event(events.append)
        yield loaded, events


def test_function_probes_replace_the_missing_tracepoints(layer: tuple[EventLayer, list[Event]]) -> None:
    probes = layer[0].probes
    print(probes)
    assert probes["tcp_conn_request"].attached, probes
    assert probes["tcp_v4_syn_recv_sock"].attached, probes
    if "sock:sk_data_ready" not in probes:
        assert probes["inet_csk_complete_hashdance"].attached, probes
    assert layer[0].syn_overflow_seen
    assert "tcp_conn_request" not in layer[0].mode


def test_syn_stage_drops_are_counted_with_the_client_address(
        layer: tuple[EventLayer, list[Event]], netns: Callable[[], TestNamespace]) -> None:
    """A never-accepting listen(4) gets 12 connects: 5 fill the queue, the others' SYNs (and their
    retransmits) are dropped; each drop the kernel counts, the layer counts, naming the client."""
    events_layer, events = layer
    ns = netns()
    listener = ns.listen(f"tcp4:{BACKLOG}")
    ready = listener.ready()["listeners"][0]
    port, inode = ready["port"], ready["inode"]
    before = ns.nstat()
    flood = ns.flood([(f"tcp:127.0.0.1:{port}", CONNECTS)])
    flood.ready()

    def dropped() -> int:
        events_layer.poll(50)
        return sum(1 for e in events if e.inode == inode and e.kind == "syn-overflow")

    wait_until(lambda: dropped() >= CONNECTS - FULL, "SYN-stage drops of the clients that found the queue full",
               timeout=20)
    flood.stop()
    time.sleep(0.2)
    events_layer.poll(50)
    after = ns.nstat()
    # Read while the listener lives: closing it removes its entries from the maps.
    seen = events_layer.read()[inode]
    listener.stop()
    overflows = after.get("TcpExtListenOverflows", 0) - before.get("TcpExtListenOverflows", 0)
    print(f"{seen}; ListenOverflows {overflows}")
    assert seen.enqueued == FULL
    assert seen.syn_overflow is not None and seen.syn_overflow >= CONNECTS - FULL
    # Every overflow the kernel counted is either a dropped SYN or a dropped handshake ACK.
    assert seen.syn_overflow + seen.ack_overflow == overflows
    drops = [e for e in events if e.inode == inode and e.kind == "syn-overflow"]
    assert {e.peer for e in drops} == {"127.0.0.1"}
    assert all(e.peer_port > 0 and e.queue == FULL and e.backlog == BACKLOG for e in drops)
    assert seen.requested_backlog == BACKLOG


def test_queue_wait_and_requested_backlog_from_the_syscall_exits(
        layer: tuple[EventLayer, list[Event]], netns: Callable[[], TestNamespace]) -> None:
    """accept() and listen() are seen at their exit tracepoints, their arguments read from the
    registers the syscall saved (bpf_task_pt_regs), on this kernel as on the development one (where
    tests/integration/test_ebpf.py checks the same natively)."""
    events_layer, events = layer
    ns = netns()
    clients = 3
    done = ns.spawn("eventload.py", ["acceptor", "--clients", str(clients), "--every", "0.3"],
                    "DONE").ready(timeout=60)
    seen = events_layer.read()[done["inode"]]
    assert (seen.accepts, seen.enqueued, seen.requested_backlog) == (clients, clients, clients)

    def accepted() -> list[Event]:
        events_layer.poll(50)
        return sorted((e for e in events if e.inode == done["inode"] and e.kind == "accept"), key=lambda e: e.ts_ns)

    wait_until(lambda: len(accepted()) == clients, "an accept event per connection", timeout=20)
    # Each wait inside the window the helper's clock readings allow (the child may be queued just
    # after connect() returned: 5 ms of slack on that side).
    for event, connected, taken in zip(accepted(), done["connected"], done["accepted"], strict=True):
        assert taken[0] - connected[1] - 0.005 <= event.value / 1e9 <= taken[1] - connected[0], event
    assert seen.queue_wait_ms is not None

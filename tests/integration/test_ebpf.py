"""The eBPF event layer on the real kernel, checked against what ss and nstat say in the same namespace.

One EventLayer (EMIT_ALL) is compiled for the whole session; each test makes its own namespace and
listeners and looks only at its own listener inodes, so other tests (and anything else on the host)
cannot disturb the counts. Where a count depends on timing (SYN-ACK timers keep firing), eBPF, ss
and nstat are read together until two rounds agree, never with a fixed sleep.

Kernel facts the checks rely on (measured on this 6.18 VM, /work/shared/notes/kernel-feasibility.md §3):
  - a listener with backlog N holds N+1 connections (sk_acceptq_is_full is ack_backlog > max);
  - a SYN dropped at a full queue adds 1 to ListenOverflows and 1 to the listener's ss d<N>;
    an ACK-stage overflow adds 1 to ListenOverflows and 2 to d<N> (tcp_listendrop and the
    discard path). So for one listener, ACK-stage overflows = delta d - delta ListenOverflows;
  - a SYN-ACK retransmit counts in TcpExtTCPSynRetrans (tcp_rtx_synack; there is no separate
    SYN-ACK counter), alongside the client's SYN retransmits.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aqtune.collect import bpftables, ebpf, ebpf_child
from aqtune.collect.ebpf import EMIT_ALL, EMIT_DROPS, Event, EventLayer, How, ProbeState, percentile
from aqtune.collect.netns import NamespaceRef, entered
from aqtune.records import ListenerEvents
from aqtune.surfaces.trace import HEADER, SUMMARY_HEADER
from tests.helpers.aqtune_run import Daemon, write_policy
from tests.helpers.kernelview import SsListener
from tests.helpers.namespace import PYTHON, REPO, HelperProcess, TestNamespace, wait_until
from tests.integration.expect import bursts, draining_listener, flood_target, wait_for_queues

pytestmark = [
    pytest.mark.integration,
    # bcc 0.26 warns for every str name it is given; aqtune's names are str, and that is bcc's concern.
    pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning"),
]

KPROBE_EVENTS = "/sys/kernel/tracing/kprobe_events"
RUN_NETNS = "/run/netns"
SOMAXCONN = "net.core.somaxconn"
CAPPED = 64
ASKED = 1024
CAPPED_FLOOD = 120  # per burst: 65 fill the capped queue; the rest are dropped SYNs, which make it "saturated"
POLICY = 'mode = "recommend"\ninterval = 0.5\n\n[saturation]\nsustain = 1\n'


# --- the session's event layer -------------------------------------------------------------------------


class Recorder:
    """The session's EventLayer and the events of this session's namespaces.

    EMIT_ALL sends every listener's events on the host through one perf buffer, and a busy neighbour
    (a benchmark in another namespace, tens of thousands of events a second) overflows trace's
    256-page buffer whenever the reader is starved for a moment on a loaded 2-core machine. So the
    layer gets a 1024-page one, and a thread reads it all the time. Only events from namespaces this
    test process made (aqt-<pid>-*) are kept; the others are decoded and dropped.
    """

    PAGES = 1024  # per CPU: about 35,000 events
    # How long a namespace inode stays judged "not ours". Namespace inode numbers are reused at once
    # (lowest free id), so a neighbour's deleted namespace may come back as one of ours; a test's
    # first event comes well after its namespace was made, and by then the judgement has expired.
    FOREIGN_FOR_NS = 20_000_000

    def __init__(self, layer: EventLayer) -> None:
        self.layer = layer
        self.events: list[Event] = []
        self.ours: set[int] = set()
        self.foreign: dict[int, int] = {}  # netns inode -> until when (monotonic ns) it counts as not ours
        layer.on_event(self._deliver)
        self.stop = threading.Event()
        self.poller = threading.Thread(target=self._poll, name="perf-poll", daemon=True)
        self.poller.start()

    @property
    def lost(self) -> int:
        return self.layer.lost

    def _deliver(self, event: Event) -> None:
        if event.netns not in self.ours:
            now = time.monotonic_ns()
            if self.foreign.get(event.netns, 0) > now:
                return
            # Listed afresh: a namespace's /run/netns entry holds its inode only once `ip netns add`
            # has mounted it, and the directory's mtime does not change with that mount.
            self.ours = our_namespaces()
            if event.netns not in self.ours:
                self.foreign[event.netns] = now + self.FOREIGN_FOR_NS
                return
        self.events.append(event)

    def _poll(self) -> None:
        while not self.stop.is_set():
            self.layer.poll(50)

    def stop_polling(self) -> None:
        # The poller must be gone before bcc frees the perf readers it is blocked in (the layer's close).
        self.stop.set()
        self.poller.join(timeout=5)

    def read(self, inode: int) -> ListenerEvents | None:
        return self.layer.read().get(inode)

    def of(self, inode: int, kind: str | None = None, until_ns: int | None = None) -> list[Event]:
        """Events of ``inode`` in time order; with ``until_ns``, only those up to that CLOCK_MONOTONIC time."""
        return sorted((e for e in list(self.events) if e.inode == inode and (kind is None or e.kind == kind)
                       and (until_ns is None or e.ts_ns <= until_ns)), key=lambda e: e.ts_ns)

    def wait_for(self, inode: int, kind: str, count: int, until_ns: int | None = None,
                 timeout: float = 5.0) -> list[Event]:
        """At least ``count`` events of ``kind`` for ``inode``: perf buffer delivery is asynchronous."""
        try:
            return wait_until(lambda: (found := self.of(inode, kind, until_ns)) and len(found) >= count and found,
                              f"{count} {kind} event(s) for inode {inode}", timeout=timeout)
        except AssertionError as exc:
            if self.lost:  # say so: a missing event then says nothing about aqtune's probes
                raise AssertionError(f"{exc}; the perf buffer has lost {self.lost} events in this session "
                                     "(EMIT_ALL carries every namespace's events: load elsewhere)") from None
            raise


def our_namespaces() -> set[int]:
    """Inodes of the namespaces this test process made (conftest's and this file's are aqt-<pid>-*)."""
    found = set()
    for entry in os.scandir(RUN_NETNS):
        if entry.name.startswith(f"aqt-{os.getpid()}-"):
            with contextlib.suppress(OSError):  # one being deleted right now
                found.add(os.stat(entry.path).st_ino)
    return found


# The layer compiled in this process with bcc (trace's way), and compiled in a child that hands its
# descriptors over (the daemon's way, read without bcc): every test of the session layer runs on both.
BACKENDS = {"bcc": EventLayer.start, "child": EventLayer.start_in_child}


@pytest.fixture(scope="session", params=list(BACKENDS))
def layer(request: pytest.FixtureRequest) -> Iterator[Recorder]:
    with BACKENDS[request.param](emit=EMIT_ALL, pages=Recorder.PAGES) as events:
        recorder = Recorder(events)
        try:
            yield recorder
        finally:
            recorder.stop_polling()


# --- reading eBPF, ss and nstat together ---------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    events: ListenerEvents
    row: SsListener
    counters: dict[str, int]
    peak: int | None  # the highest peak_queue any read in the round returned (read() drains it)
    at_ns: int  # CLOCK_MONOTONIC (bpf_ktime_get_ns's clock) as the round began: the counts hold exactly the
    # events stamped up to here (nothing happened during the round), not those of later SYN-ACK timers


def settled(recorder: Recorder, ns: TestNamespace, address: str, inode: int, timeout: float = 8.0) -> Reading:
    """eBPF counters, the ss row and nstat from one quiet moment: nstat and eBPF are read before and
    after ss, and the round counts only if neither moved (SYN-ACK timers keep firing in the background)."""
    deadline = time.monotonic() + timeout
    peak: int | None = None
    while True:
        at_ns = time.monotonic_ns()
        first = recorder.read(inode)
        before = ns.nstat()
        row = ns.ss_tcp().get(address)
        after = ns.nstat()
        second = recorder.read(inode)
        for reading in (first, second):
            if reading is not None and reading.peak_queue is not None:
                peak = max(peak or 0, reading.peak_queue)
        if (first is not None and second is not None and row is not None and before == after
                and dataclasses.replace(first, peak_queue=None, oldest_queued_ms=None)
                == dataclasses.replace(second, peak_queue=None, oldest_queued_ms=None)):
            return Reading(second, row, after, peak, at_ns)
        if time.monotonic() >= deadline:
            raise AssertionError(f"eBPF, ss and nstat never agreed on {address} within {timeout} s: {first} {second}")
        time.sleep(0.05)


def delta(after: dict[str, int], before: dict[str, int], name: str) -> int:
    return after.get(f"TcpExt{name}", 0) - before.get(f"TcpExt{name}", 0)


def listener_of(helper: HelperProcess, index: int = 0) -> dict[str, Any]:
    listener: dict[str, Any] = helper.ready()["listeners"][index]
    return listener


# --- 1. enqueue, peaks, requested backlog ---------------------------------------------------------------


def test_enqueue_peak_and_requested_backlog_match_ss(layer: Recorder, netns: Callable[[], TestNamespace]) -> None:
    ns = netns()
    before = ns.nstat()
    helper = ns.listen("tcp4:8", f"unix:4:{ns.unix_path('s')}", "tcp6:2")
    tcp, unix, tcp6 = (listener_of(helper, index) for index in range(3))
    ns.flood([(flood_target(tcp), 20), (flood_target(unix), 8), (flood_target(tcp6), 3)])
    wait_for_queues(ns, {tcp["address"]: 9, unix["address"]: 5, tcp6["address"]: 3})
    # One read: it drains the peaks of every listener at once, as each sweep does.
    peaks = {inode: events.peak_queue for inode, events in layer.layer.read().items()}
    assert [peaks.get(listener["inode"]) for listener in (tcp, unix, tcp6)] == [9, 5, 3]  # = ss Recv-Q
    now = settled(layer, ns, tcp["address"], tcp["inode"])
    # listen(8) holds 9; the other 11 SYNs were dropped at the SYN stage, which eBPF cannot see here.
    assert now.row.queue == 9 and now.row.backlog == 8
    assert (now.events.enqueued, now.events.requested_backlog) == (9, 8)
    assert (now.events.ack_overflow, now.events.syn_overflow, now.events.accepts) == (0, None, 0)
    assert now.events.queue_wait_ms is None
    overflows = delta(now.counters, before, "ListenOverflows")
    # 11 dropped SYNs (22 once their retransmits came too): all SYN-stage, 1 each in both counts.
    assert overflows == now.row.drops and overflows >= 11
    assert now.events.ack_overflow == (now.row.drops or 0) - overflows
    drained = layer.read(tcp["inode"])
    assert drained is not None and drained.peak_queue is None and drained.enqueued == 9
    # The perf events tell the same story: listen(8), then arrivals at queue lengths 1..9.
    (listen,) = layer.wait_for(tcp["inode"], "listen", 1)
    assert (listen.value, listen.backlog, listen.queue, listen.port, listen.netns) == (8, 8, 0, tcp["port"], ns.inode)
    assert listen.pid == helper.ready()["pid"] and listen.comm == "aqt-listen"
    assert sorted(e.queue for e in layer.wait_for(tcp["inode"], "enqueue", 9)) == list(range(1, 10))
    # A Unix listener: enqueues (and the peak above) from its receive queue, its listen() too.
    unix_events = layer.read(unix["inode"])
    assert unix_events is not None
    assert (unix_events.enqueued, unix_events.requested_backlog) == (5, 4)
    assert ns.ss_unix()[unix["address"]].queue == 5
    # IPv6: the listener's address comes from skc_v6_rcv_saddr.
    six = layer.read(tcp6["inode"])
    assert six is not None and (six.enqueued, six.requested_backlog) == (3, 2)
    assert {(e.family, e.local, e.port) for e in layer.wait_for(tcp6["inode"], "enqueue", 3)} == {
        (10, "::1", tcp6["port"])}

    # Re-listen with 16: the requested backlog follows, and the dropped clients' SYN retransmits
    # (about 1 s after their first SYN) fill the queue to 17.
    helper.request("relisten 0 16")
    relistened = layer.read(tcp["inode"])
    assert relistened is not None and relistened.requested_backlog == 16
    wait_for_queues(ns, {tcp["address"]: 17}, timeout=10)
    later = settled(layer, ns, tcp["address"], tcp["inode"])
    assert (later.events.enqueued, later.peak, later.row.queue, later.row.backlog) == (17, 17, 17, 16)
    # Retransmitted SYNs arrive together, so several can pass the SYN check before their ACKs find the
    # queue full: whatever ACK-stage overflows happened, eBPF counted exactly those.
    assert later.events.ack_overflow == (later.row.drops or 0) - delta(later.counters, before, "ListenOverflows")
    assert len(layer.wait_for(tcp["inode"], "ack-overflow", later.events.ack_overflow, later.at_ns)) == (
        later.events.ack_overflow)


# --- 2. requested backlog above somaxconn, into the advice ---------------------------------------------


class Aqtune(Daemon):
    """`aqtune run` behind a wrapper command (unshare, nsenter, setpriv), logging to a file in console form."""

    def __init__(self, prefix: Sequence[str], args: Sequence[str], log_path: Path) -> None:
        self.args = [*prefix, PYTHON, "-m", "aqtune", "run", *args]
        self.log_path = log_path
        # Console lines in the file, even where a journald socket exists.
        env = {**os.environ, "AQTUNE_LOG": "console"}
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=REPO, env=env)

    def text(self) -> str:
        return "\n".join(self.lines())


@pytest.fixture
def aqtune_run(tmp_path: Path) -> Iterator[Callable[..., Aqtune]]:
    started: list[Aqtune] = []

    def start(ns: TestNamespace, *extra: str, prefix: Sequence[str] = ()) -> Aqtune:
        policy = write_policy(tmp_path / "policy.toml", POLICY)
        state = tmp_path / f"state{len(started)}"
        daemon = Aqtune(prefix, ["--dry-run", "--netns", ns.name, "--config", str(policy), "--state-dir", str(state),
                                 *extra], tmp_path / f"aqtune{len(started)}.log")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def capped_listener(ns: TestNamespace, load: contextlib.ExitStack) -> dict[str, Any]:
    """listen(1024) where somaxconn is 64, drained fast by its worker but hit by bursts larger than its queue:
    the capped-by-somaxconn case (a longer queue would help)."""
    ns.set_sysctl(SOMAXCONN, CAPPED)
    _, listener = draining_listener(ns, f"tcp4:{ASKED}")
    assert ns.ss_tcp()[listener["address"]].backlog == CAPPED
    load.enter_context(bursts(ns, listener, CAPPED_FLOOD, every=2.0))
    return listener


@pytest.fixture
def load() -> Iterator[contextlib.ExitStack]:
    """Load started by a test, stopped after it whatever its outcome."""
    with contextlib.ExitStack() as stack:
        yield stack


def test_requested_backlog_above_somaxconn_reaches_the_advice(
        layer: Recorder, netns: Callable[[], TestNamespace], aqtune_run: Callable[..., Aqtune],
        load: contextlib.ExitStack) -> None:
    ns = netns()
    daemon = aqtune_run(ns)
    # Only a listen() made after aqtune loaded its programs can be seen.
    active = daemon.wait_for("eBPF: partial: tcp_conn_request not observed", timeout=20)
    # The daemon compiled in a child that is gone, and holds the layer without bcc's libraries.
    assert compiler_libraries(daemon.pid) == set()
    assert children_of(daemon.pid) == []
    listener = capped_listener(ns, load)
    seen = layer.read(listener["inode"])
    assert seen is not None and seen.requested_backlog == ASKED  # while ss says 64
    daemon.wait_for("capped-by-somaxconn", f"backlog {CAPPED} is net.core.somaxconn's limit",
                    f"the application asked for {ASKED}", f"requested={ASKED}", after=active)
    assert daemon.count("eBPF probe tcp_conn_request not attached: fentry refused (EPERM); kprobes absent") == 1
    assert daemon.stop() == 0


# --- 3 and 4. ACK-stage overflows and SYN-ACK retransmits, made deterministic with nft -----------------

HELD_SOURCE = "127.0.0.2"
HELD = 3  # clients whose handshake-completing ACKs nft drops
FILLERS = 5  # listen(4) holds 5


@dataclass
class AckStage:
    ns: TestNamespace
    listener: dict[str, Any]
    held_ports: list[int]
    before: dict[str, int]
    reading: Reading
    acceptor: dict[str, Any]
    trace: subprocess.Popen[bytes]
    trace_out: Path
    trace_err: Path


def nft(ns: TestNamespace, *words: str) -> None:
    ns.run("nft", *words)


def syn_recv_count(ns: TestNamespace, port: int) -> int:
    return len(ns.run("ss", "-tnH", "state", "syn-recv", "sport", "=", f":{port}").splitlines())


@pytest.fixture(scope="module")
def ack_stage(layer: Recorder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AckStage]:
    """One listen(4) in its own namespace, `aqtune trace --netns` watching it:
    1. nft (in that namespace only) drops the pure ACKs from 127.0.0.2, so 3 clients from there
       stay half-open on the server (SYN_RECV) while believing they are connected;
    2. 5 clients from 127.0.0.1 fill the queue (5 of 5): no SYN is ever dropped at a full queue;
    3. the rule goes; each SYN-ACK retransmit (about 1 s, then 3 s after the SYN) brings a held
       client's ACK to a full queue: an ACK-stage overflow, and nothing else.
    Then a second listener in the namespace accepts one connection, for the trace's accept line."""
    assert shutil.which("nft"), "nftables is needed for the ACK-stage recipe: `make test-deps` installs it"
    ns = TestNamespace(f"aqt-{os.getpid()}-ack")
    out_dir = tmp_path_factory.mktemp("trace")
    trace_out, trace_err = out_dir / "stdout", out_dir / "stderr"
    trace: subprocess.Popen[bytes] | None = None
    try:
        with open(trace_out, "wb") as out, open(trace_err, "wb") as err:
            trace = subprocess.Popen([PYTHON, "-m", "aqtune", "trace", "--netns", ns.name], stdout=out, stderr=err,
                                     stdin=subprocess.DEVNULL, cwd=REPO)
        wait_until(lambda: trace_out.read_text().startswith(HEADER) or trace.poll() is not None,
                   "aqtune trace's header", timeout=20)
        assert trace.poll() is None, trace_err.read_text()
        before = ns.nstat()
        listener = listener_of(ns.listen("tcp4:4"))
        port = listener["port"]
        nft(ns, "add", "table", "inet", "aqt")
        nft(ns, "add", "chain", "inet", "aqt", "out", "{ type filter hook output priority 0; }")
        nft(ns, "add", "rule", "inet", "aqt", "out", "ip", "saddr", HELD_SOURCE, "tcp", "dport", str(port),
            "tcp", "flags", "==", "ack", "drop")
        held = ns.spawn("eventload.py", ["clients", "--to", listener["address"], "--count", str(HELD),
                                         "--src", HELD_SOURCE], "CONNECTED").ready()
        wait_until(lambda: syn_recv_count(ns, port) == HELD, f"{HELD} held handshakes")
        ns.flood([(flood_target(listener), FILLERS)])
        wait_for_queues(ns, {listener["address"]: FILLERS})
        nft(ns, "delete", "table", "inet", "aqt")
        wait_until(lambda: (e := layer.read(listener["inode"])) and e.ack_overflow >= HELD,
                   "the first ACK-stage overflows", timeout=10)
        reading = settled(layer, ns, listener["address"], listener["inode"])
        acceptor = ns.spawn("eventload.py", ["acceptor", "--clients", "1", "--every", "0.05"], "DONE").ready()
        yield AckStage(ns, listener, held["ports"], before, reading, acceptor, trace, trace_out, trace_err)
    finally:
        if trace is not None and trace.poll() is None:
            trace.kill()
            trace.wait(timeout=10)
        ns.destroy()


def test_ack_stage_overflows_match_nstat_and_ss_and_name_the_held_peer(layer: Recorder, ack_stage: AckStage) -> None:
    reading, before, listener = ack_stage.reading, ack_stage.before, ack_stage.listener
    overflows = reading.events.ack_overflow
    assert overflows >= HELD  # each SYN-ACK timer round retries all 3
    # No SYN met a full queue, so every ListenOverflows is an ACK-stage one...
    assert delta(reading.counters, before, "ListenOverflows") == overflows
    assert delta(reading.counters, before, "ListenDrops") == overflows
    # ...and the listener's socket drops count 2 for each.
    assert reading.row.drops == 2 * overflows
    assert reading.events.syn_overflow is None
    assert (reading.events.enqueued, reading.row.queue, reading.events.requested_backlog) == (FILLERS, FILLERS, 4)
    events = layer.wait_for(listener["inode"], "ack-overflow", overflows, reading.at_ns)
    assert len(events) == overflows
    for event in events:
        assert (event.peer, event.family, event.netns) == (HELD_SOURCE, 2, ack_stage.ns.inode)
        assert event.peer_port in ack_stage.held_ports
        assert (event.local, event.port, event.queue, event.backlog) == ("127.0.0.1", listener["port"], 5, 4)
    assert {e.peer_port for e in events} == set(ack_stage.held_ports)


def test_synack_retransmits_match_nstat(layer: Recorder, ack_stage: AckStage) -> None:
    reading = ack_stage.reading
    retransmits = reading.events.synack_retransmits
    assert retransmits >= HELD
    # No client retransmitted a SYN here (each got its SYN-ACK), so TCPSynRetrans is all SYN-ACKs.
    assert delta(reading.counters, ack_stage.before, "TCPSynRetrans") == retransmits
    # Every held ACK that overflowed answered a retransmitted SYN-ACK.
    assert retransmits == reading.events.ack_overflow
    events = layer.wait_for(ack_stage.listener["inode"], "synack-retrans", retransmits, reading.at_ns)
    assert len(events) == retransmits
    assert {(e.peer, e.peer_port) for e in events} == {(HELD_SOURCE, port) for port in ack_stage.held_ports}
    overflows = layer.of(ack_stage.listener["inode"], "ack-overflow", reading.at_ns)
    for overflow in overflows:
        assert any(e.peer_port == overflow.peer_port and e.ts_ns <= overflow.ts_ns for e in events), overflow


# --- 5. queue wait --------------------------------------------------------------------------------------

WAIT_CLIENTS = 5
ACCEPT_EVERY = 0.3
# Server-side the child is queued when the client's ACK is processed, which on loopback may be just
# after connect() returned: the measured window is widened by this much on its early side.
HANDSHAKE_SLACK_S = 0.005


def bucket(seconds: float) -> int:
    """The log2(us) bucket the BPF program puts a wait in (bucket i holds [2^i, 2^(i+1)) us)."""
    return min(max(int(seconds * 1e6), 1).bit_length() - 1, 31)


def test_queue_wait_histogram_brackets_the_measured_waits(
        layer: Recorder, netns: Callable[[], TestNamespace]) -> None:
    ns = netns()
    done = ns.spawn("eventload.py", ["acceptor", "--clients", str(WAIT_CLIENTS), "--every", str(ACCEPT_EVERY)],
                    "DONE").ready(timeout=15)
    inode = done["inode"]
    windows = [(accepted[0] - connected[1] - HANDSHAKE_SLACK_S, accepted[1] - connected[0])
               for connected, accepted in zip(done["connected"], done["accepted"], strict=True)]
    seen = layer.read(inode)
    assert seen is not None
    assert (seen.accepts, seen.enqueued, seen.requested_backlog) == (WAIT_CLIENTS, WAIT_CLIENTS, WAIT_CLIENTS)
    # Each accept event carries the exact wait, in ns on the same clock: inside its measured window.
    events = {e.peer_port: e for e in layer.wait_for(inode, "accept", WAIT_CLIENTS)}
    assert set(events) == set(done["peer_ports"])
    waits = []
    for port, (low, high) in zip(done["peer_ports"], windows, strict=True):
        wait = events[port].value / 1e9
        assert low <= wait <= high, (port, low, wait, high)
        waits.append(wait)
    # The spacing makes them about 0.3, 0.6, 0.9, 1.2 and 1.5 s (later under load), so p50 and p99
    # come from different buckets: 1048.576 and 2097.152 ms on a quiet machine.
    assert waits == sorted(waits) and waits[0] >= ACCEPT_EVERY - HANDSHAKE_SLACK_S
    histogram = [0] * 32
    for wait in waits:
        histogram[bucket(wait)] += 1
    assert seen.queue_wait_ms == {"p50": percentile(histogram, 0.5), "p99": percentile(histogram, 0.99)}
    # What an operator reads: p50 and p99 are upper bounds within a factor of 2 of the true figures.
    p50, p99 = seen.queue_wait_ms["p50"], seen.queue_wait_ms["p99"]
    assert p50 / 2 <= statistics.median(waits) * 1000 < p50
    assert p99 / 2 <= max(waits) * 1000 < p99


def test_unix_queue_wait_is_timed_too(layer: Recorder, netns: Callable[[], TestNamespace], tmp_path: Path) -> None:
    """A Unix stream listener's queue is its receive queue, first in, first out like a TCP one."""
    ns = netns()
    done = ns.spawn("eventload.py", ["acceptor", "--clients", str(WAIT_CLIENTS), "--every", str(ACCEPT_EVERY),
                                     "--unix", str(tmp_path / "queue.sock")], "DONE").ready(timeout=15)
    seen = layer.read(done["inode"])
    assert seen is not None
    assert (seen.accepts, seen.enqueued) == (WAIT_CLIENTS, WAIT_CLIENTS)
    # A Unix connect is queued before connect() returns: the window needs no slack.
    windows = [(accepted[0] - connected[1], accepted[1] - connected[0])
               for connected, accepted in zip(done["connected"], done["accepted"], strict=True)]
    events = layer.wait_for(done["inode"], "accept", WAIT_CLIENTS)
    waits = [event.value / 1e9 for event in events]
    assert all(low <= wait <= high for wait, (low, high) in zip(waits, windows, strict=True)), (waits, windows)
    histogram = [0] * 32
    for wait in waits:
        histogram[bucket(wait)] += 1
    assert seen.queue_wait_ms == {"p50": percentile(histogram, 0.5), "p99": percentile(histogram, 0.99)}


QUEUED = 3
APART = 0.2  # seconds between the connects: far more than a read() takes, even on a loaded machine


def test_oldest_queued_age_matches_the_clients_clock(layer: Recorder, netns: Callable[[], TestNamespace]) -> None:
    """A listener that never accepts: the oldest queued connection's age is the time since its client
    connected, by this process's CLOCK_MONOTONIC (bpf_ktime_get_ns's clock), whether read() is given
    the sweep's queue lengths or counts from the accepts it saw (none)."""
    ns = netns()
    listener = listener_of(ns.listen("tcp4:8"))
    host, _, port = listener["address"].rpartition(":")
    clients: list[socket.socket] = []
    connected: list[tuple[float, float]] = []
    try:
        with entered(NamespaceRef(ns.name, ns.inode, f"{RUN_NETNS}/{ns.name}")):
            for _ in range(QUEUED):
                client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                clients.append(client)
                before = time.monotonic()
                client.connect((host, int(port)))
                connected.append((before, time.monotonic()))
                time.sleep(APART)  # so that the oldest is told from the others
        wait_for_queues(ns, {listener["address"]: QUEUED})
        queue = ns.ss_tcp()[listener["address"]].queue
        for queues in ({listener["inode"]: queue}, None):
            before = time.monotonic()
            seen = layer.layer.read(queues)[listener["inode"]]
            after = time.monotonic()
            assert seen.oldest_queued_ms is not None, queues
            # Queued between the first connect()'s start and a moment after it returned (the server
            # may take the final ACK just after): the age read lies in the window that leaves.
            low = (before - connected[0][1] - HANDSHAKE_SLACK_S) * 1000
            high = (after - connected[0][0]) * 1000
            assert low <= seen.oldest_queued_ms <= high, (queues, low, seen.oldest_queued_ms, high)
            # Not the second connection's age: that one came APART later.
            assert seen.oldest_queued_ms > (after - connected[1][0]) * 1000
        # An empty queue is known to be empty.
        assert layer.layer.read({listener["inode"]: 0})[listener["inode"]].oldest_queued_ms == 0.0
    finally:
        for client in clients:
            client.close()


def test_once_everything_is_accepted_nothing_is_queued(layer: Recorder, netns: Callable[[], TestNamespace]) -> None:
    done = netns().spawn("eventload.py", ["acceptor", "--clients", "3", "--every", "0.05"], "DONE").ready(timeout=15)
    for queues in ({done["inode"]: 0}, None):
        assert layer.layer.read(queues)[done["inode"]].oldest_queued_ms == 0.0


def test_a_quiet_listener_reads_the_same_until_its_figures_move(layer: Recorder,
                                                                 netns: Callable[[], TestNamespace]) -> None:
    """A listener whose map values did not move and whose queue is empty is not decoded again (a
    thousand quiet listeners per sweep); a queue that is not empty, or one more connection, is."""
    ns = netns()
    helper = ns.listen("tcp4:8")
    (listener,) = helper.ready()["listeners"]
    inode = int(listener["inode"])
    helper.request("drain 0 0.05", timeout=10)  # accepts and closes whatever gets queued

    def accepted(count: int) -> ListenerEvents | None:
        seen = layer.layer.read({inode: 0}).get(inode)
        return seen if seen is not None and seen.accepts >= count else None

    clients = ns.spawn("eventload.py", ["clients", "--to", listener["address"], "--count", "2"], "CONNECTED")
    clients.ready(timeout=10)
    wait_until(lambda: accepted(2), "2 connections accepted", timeout=10)
    first = layer.layer.read({inode: 0})[inode]
    again = layer.layer.read({inode: 0})[inode]
    assert again is first
    # Every queue empty: the whole read is kept, and the next one that finds the maps as they were
    # returns it as it is (another test's listener moving meanwhile makes it work everything out).
    every = {watched: 0 for watched in layer.layer.read()}
    whole = layer.layer.read(every)
    assert layer.layer._quiet is not None and layer.layer.read(every)[inode] == whole[inode] == first
    waiting = layer.layer.read({inode: 1})[inode]  # the oldest's age depends on the time: worked out
    assert waiting is not first and waiting.accepts == first.accepts
    assert layer.layer._quiet is None, "a queue not read as empty: nothing kept whole"
    more = ns.spawn("eventload.py", ["clients", "--to", listener["address"], "--count", "1"], "CONNECTED")
    more.ready(timeout=10)
    moved = wait_until(lambda: accepted(first.accepts + 1), "one more connection accepted", timeout=10)
    assert moved.enqueued == first.enqueued + 1 and moved is not first
    clients.close()
    more.close()


# The wall clock seen from two processes, each turning CLOCK_MONOTONIC into it a moment apart: the
# offsets they measure may differ by the time between two clock reads (and NTP's slew meanwhile).
CLOCK_CONVERSION_S = 0.001


def accepted_sockets(ns: TestNamespace, port: int) -> dict[int, int]:
    """Peer port -> socket inode of the server side of each established connection to ``port`` (ss)."""
    found = {}
    for line in ns.run("ss", "-tnHe", "state", "established", "sport", "=", f":{port}").splitlines():
        peer = re.search(r"\s\S+:(\d+)\s+(?:timer|uid|ino)", line)
        inode = re.search(r"\bino:(\d+)", line)
        assert peer and inode, line
        found[int(peer.group(1))] = int(inode.group(1))
    return found


def test_accept_times_of_accepted_sockets_match_the_acceptors_clock(
        layer: Recorder, netns: Callable[[], TestNamespace]) -> None:
    ns = netns()
    done = ns.spawn("eventload.py", ["acceptor", "--clients", str(WAIT_CLIENTS), "--every", "0.1"],
                    "DONE").ready(timeout=15)
    inodes = accepted_sockets(ns, done["port"])
    assert sorted(inodes) == sorted(done["peer_ports"])
    wall_minus_monotonic = time.time() - time.monotonic()
    seen = layer.layer.accepted_at([*inodes.values(), 1])  # 1: no such socket
    assert set(seen) == set(inodes.values())
    for port, (before, after) in zip(done["peer_ports"], done["accepted"], strict=True):
        accepted = seen[inodes[port]] - wall_minus_monotonic
        assert before - CLOCK_CONVERSION_S <= accepted <= after + CLOCK_CONVERSION_S, (port, before, accepted, after)


def test_closed_listeners_are_forgotten_after_two_sweeps_without_them(
        layer: Recorder, netns: Callable[[], TestNamespace]) -> None:
    ns = netns()
    closing = ns.spawn("eventload.py", ["acceptor", "--clients", "1", "--every", "0"], "DONE")
    staying = ns.spawn("eventload.py", ["acceptor", "--clients", "1", "--every", "0"], "DONE")
    gone, kept = closing.ready(timeout=15)["inode"], staying.ready(timeout=15)["inode"]
    closing.stop()
    wait_until(lambda: gone not in {row.inode for row in ns.ss_tcp().values()}, "the closed listener gone from ss")
    assert kept in {row.inode for row in ns.ss_tcp().values()}
    ours = {gone, kept}
    seen = layer.layer.read().keys()
    assert ours <= seen
    # The session's layer also holds other tests' listeners: they count as live here, and are left alone.
    live = set(seen) - {gone}
    layer.layer.forget_closed(live)  # one sweep without it: a listener opened after it may look so
    assert ours <= layer.layer.read().keys()
    layer.layer.forget_closed(live)
    after = layer.layer.read()
    assert gone not in after and after[kept].accepts == 1
    # The daemon reads with the sweep's queues: listeners the sweep did not find are not decoded.
    assert layer.layer.read({kept: 0}).keys() == {kept}


# --- 6. SYN-stage drops are not observable on this kernel, and status says so ---------------------------


def test_syn_overflow_is_unobserved_and_the_probe_state_says_why(
        layer: Recorder, netns: Callable[[], TestNamespace]) -> None:
    state = layer.layer.probes["tcp_conn_request"]
    # The kernel fact first, read independently of aqtune: this VM's kernel is built without kprobes.
    assert not os.path.exists(KPROBE_EVENTS), f"{KPROBE_EVENTS} exists: a kernel with kprobes, not this VM's"
    # fentry is refused with EPERM here (no trampolines), kprobes are compiled out: both are named.
    assert state == ProbeState.failed(f"fentry refused (EPERM); kprobes absent (no {KPROBE_EVENTS})")
    others = {probe: how for probe, how in layer.layer.probes.items() if probe != "tcp_conn_request"}
    assert all(how.attached for how in others.values()), others
    assert "tcp_conn_request not observed" in layer.layer.mode
    assert "SYN-stage drops are counted only from the sweep" in layer.layer.mode
    assert layer.layer.status()["probes"]["tcp_conn_request"] == state.text
    # A real SYN-stage drop: counted by the kernel, absent from eBPF, and not mistaken for an ACK-stage one.
    ns = netns()
    before = ns.nstat()
    listener = listener_of(ns.listen("tcp4:1"))
    ns.flood([(flood_target(listener), 4)])
    wait_for_queues(ns, {listener["address"]: 2}, min_drops={listener["address"]: 2})
    now = settled(layer, ns, listener["address"], listener["inode"])
    assert delta(now.counters, before, "ListenOverflows") == now.row.drops >= 2
    assert (now.events.syn_overflow, now.events.ack_overflow) == (None, 0)
    assert layer.of(listener["inode"], "syn-overflow") == []


# --- 7. aqtune trace -------------------------------------------------------------------------------------


def test_trace_prints_the_namespace_events_and_the_degradation(layer: Recorder, ack_stage: AckStage) -> None:
    listener, acceptor, ns = ack_stage.listener, ack_stage.acceptor, ack_stage.ns
    address = listener["address"]
    overflows = ack_stage.reading.events.ack_overflow

    def lines() -> list[str]:
        return ack_stage.trace_out.read_text().splitlines()

    # trace prints as it polls (every 100 ms): wait for the last kinds of line before stopping it.
    wait_until(lambda: sum(" ack-overflow " in line for line in lines()) >= overflows
               and any(" accept " in line for line in lines()), "the trace lines", timeout=10)
    ack_stage.trace.send_signal(signal.SIGINT)
    assert ack_stage.trace.wait(timeout=10) == 0
    out, err = lines(), ack_stage.trace_err.read_text()
    assert out[0] == HEADER
    rows = [line.split(maxsplit=6) for line in out[1:]]
    assert rows and all(row[2] == ns.name for row in rows), "only events of the namespace asked for"
    # Lines come per CPU buffer as polled, so across CPUs they need not be in time order.
    mine = [row for row in rows if row[3] == address]
    kinds = [row[1] for row in mine]
    assert kinds.count("listen") == 1 and kinds.count("enqueue") == FILLERS
    assert kinds.count("ack-overflow") >= overflows and kinds.count("synack-retrans") >= overflows
    (listen,) = [row for row in mine if row[1] == "listen"]
    assert listen[4:6] == ["0/4", "-"]
    assert re.fullmatch(r"listen\(backlog=4\) -> effective 4 \(pid \d+ aqt-listen\)", listen[6])
    assert sorted(row[4] for row in mine if row[1] == "enqueue") == [f"{n}/4" for n in range(1, FILLERS + 1)]
    for row in mine:
        if row[1] in ("ack-overflow", "synack-retrans"):
            peer_address, _, peer_port = row[5].rpartition(":")
            assert peer_address == HELD_SOURCE and int(peer_port) in ack_stage.held_ports, row
            assert row[4] == "5/4"
    overflow = next(row for row in mine if row[1] == "ack-overflow")
    assert overflow[6] == "handshake ACK dropped: queue full"
    accepts = [row for row in rows if row[1] == "accept"]
    assert len(accepts) == 1
    assert accepts[0][3] == acceptor["address"] and accepts[0][5] == f"127.0.0.1:{acceptor['peer_ports'][0]}"
    assert re.fullmatch(r"waited \d+\.\d ms in the queue \(pid \d+ python3\)", accepts[0][6])
    assert f"  tcp_conn_request: not attached: fentry refused (EPERM); kprobes absent (no {KPROBE_EVENTS})" in err
    assert err.startswith("aqtune trace: partial: tcp_conn_request not observed")


SUMMARY_CLIENTS = 40


def test_trace_summary_gives_a_line_per_listener_and_second_with_the_kinds_asked_for(
        netns: Callable[[], TestNamespace], tmp_path: Path) -> None:
    ns = netns()
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        trace = subprocess.Popen([PYTHON, "-m", "aqtune", "trace", "--summary", "--netns", ns.name,
                                  "--kind", "enqueue,accept"], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                 cwd=REPO)
    try:
        wait_until(lambda: out_path.read_text().startswith(SUMMARY_HEADER) or trace.poll() is not None,
                   "aqtune trace --summary's header", timeout=20)
        assert trace.poll() is None, err_path.read_text()
        done = ns.spawn("eventload.py", ["acceptor", "--clients", str(SUMMARY_CLIENTS), "--every", "0.01"],
                        "DONE").ready(timeout=15)
        address = done["address"]

        def rows() -> list[list[str]]:
            return [line.split() for line in out_path.read_text().splitlines()[1:] if f" {address} " in line]

        # A second is printed once it is over: wait for the lines that hold every accept.
        wait_until(lambda: sum(int(row[4]) for row in rows()) >= SUMMARY_CLIENTS, "the summary lines", timeout=10)
    finally:
        trace.send_signal(signal.SIGINT)
        assert trace.wait(timeout=10) == 0, err_path.read_text()
    mine = rows()
    # 80 events in 0.4 s or so: a line for each second they fell in, not a line each.
    assert 1 <= len(mine) <= 3, mine
    assert sum(int(row[3]) for row in mine) == sum(int(row[4]) for row in mine) == SUMMARY_CLIENTS
    for row in mine:
        assert row[1:3] == [ns.name, address]
        assert row[5:10] == ["-", "-", "-", "-", "-"], row  # drops, retransmits, listen(): not asked for
        assert row[11] != "-" and float(row[11]) > 0 and row[12] == "ms", row  # the p99 of the waits
    assert "per listener and second" in err_path.read_text()


# --- 8. degradation, for real ---------------------------------------------------------------------------

RELEASE = os.uname().release
NO_HEADERS = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              f'mount -t tmpfs aqt-no-headers "/lib/modules/{RELEASE}" && exec "$@"', "sh"]


def no_bpf_capabilities(ns: TestNamespace) -> list[str]:
    # setns needs CAP_SYS_ADMIN, which also grants BPF: so aqtune starts already inside the namespace
    # (nsenter does not remount /sys as `ip netns exec` does, so tracefs stays), and never needs setns.
    drop = "-bpf,-sys_admin,-perfmon"
    return ["nsenter", f"--net=/run/netns/{ns.name}", "setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}"]


@pytest.mark.parametrize("start", list(BACKENDS.values()), ids=list(BACKENDS))
def test_bpf_refused_reason_names_the_missing_capability(start: Callable[..., EventLayer]) -> None:
    drop = "-bpf,-sys_admin,-perfmon"
    script = ("from aqtune.collect.ebpf import EventLayer, Unavailable\n"
              f"try:\n    EventLayer.{start.__name__}()\nexcept Unavailable as exc:\n    print(exc)\n")
    done = subprocess.run(["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", PYTHON, "-c", script],
                          capture_output=True, text=True, timeout=60, cwd=REPO, stdin=subprocess.DEVNULL)
    reason = done.stdout.strip()
    if "Operation not permitted" not in reason:  # not refused at all: a real failure, not the expected one
        raise RuntimeError(f"expected a refusal, got {reason!r}: {done.stderr}")
    assert "CAP_BPF" in reason and "compile" not in reason


@pytest.mark.parametrize("case", ["no kernel headers", "BPF refused", "--no-ebpf"])
def test_without_ebpf_the_loop_still_sweeps_and_advises(
        case: str, netns: Callable[[], TestNamespace], aqtune_run: Callable[..., Aqtune],
        load: contextlib.ExitStack) -> None:
    ns = netns()
    listener = capped_listener(ns, load)
    if case == "no kernel headers":
        daemon = aqtune_run(ns, prefix=NO_HEADERS)
        said = f"no kernel headers at /lib/modules/{RELEASE}/build: install linux-headers-{RELEASE}"
    elif case == "BPF refused":
        daemon = aqtune_run(ns, prefix=no_bpf_capabilities(ns))
        said = "BPF refused (EPERM): aqtune needs CAP_BPF"
    else:
        daemon = aqtune_run(ns, "--no-ebpf")
        said = ""
    # The sweep goes on and still gives the advice, without the requested backlog it cannot know.
    advice = daemon.wait_for(f"{listener['address']}: backlog {CAPPED} is net.core.somaxconn's limit",
                             "the backlog the application asked for is unknown without eBPF", timeout=20)
    daemon.wait_for("recommend net.core.somaxconn=", after=-1)
    text = daemon.text()
    if said:
        (line,) = [line for line in daemon.lines() if "eBPF" in line and "unknown without eBPF" not in line]
        assert "eBPF unavailable, running on sock_diag sweeps alone: " + said in line, text
        assert daemon.matching("eBPF unavailable")[0] < advice
        if case == "BPF refused":
            assert "Operation not permitted" in line
    else:
        assert not [line for line in daemon.lines() if "eBPF" in line and "unknown without eBPF" not in line], text
    assert daemon.stop() == 0, text
    assert ns.sysctls(SOMAXCONN)[SOMAXCONN] == CAPPED  # a dry run: nothing written


def test_paused_probes_count_nothing_until_resumed(netns: Callable[[], TestNamespace]) -> None:
    """pause() and resume() let the overhead benchmark compare rounds a moment apart."""
    with EventLayer.start() as layer:
        ns = netns()
        assert layer.pause() == []  # nothing here attaches by fentry
        paused = ns.spawn("eventload.py", ["acceptor", "--clients", "2", "--every", "0"], "DONE").ready(timeout=15)
        assert paused["inode"] not in layer.read()
        layer.resume()
        resumed = ns.spawn("eventload.py", ["acceptor", "--clients", "2", "--every", "0"], "DONE").ready(timeout=15)
        seen = layer.read()[resumed["inode"]]
        assert (seen.enqueued, seen.accepts, seen.requested_backlog) == (2, 2, 2)


def test_where_registers_cannot_be_read_the_entry_tracepoints_keep_the_arguments(
        netns: Callable[[], TestNamespace], monkeypatch: pytest.MonkeyPatch) -> None:
    """The way taken on kernels without bpf_task_pt_regs (before 5.15) or on an architecture whose
    saved registers aqtune does not know, run here by making detect() say so."""
    detect = ebpf.detect
    monkeypatch.setattr(ebpf, "detect", lambda btf: dataclasses.replace(detect(btf), task_pt_regs=False))
    with EventLayer.start() as layer:
        assert layer.probes["syscalls:sys_exit_accept4"] == ProbeState.by(
            How.TRACEPOINT, "arguments kept by syscalls:sys_enter_accept4")
        done = netns().spawn("eventload.py", ["acceptor", "--clients", str(WAIT_CLIENTS), "--every", "0.05"],
                             "DONE").ready(timeout=15)
        seen = layer.read()[done["inode"]]
        assert (seen.accepts, seen.enqueued, seen.requested_backlog) == (WAIT_CLIENTS, WAIT_CLIENTS, WAIT_CLIENTS)
        assert seen.queue_wait_ms is not None and seen.queue_wait_ms["p99"] >= 50 * WAIT_CLIENTS / 2
        # pause() detaches them with the rest.
        layer.pause()
        paused = netns().spawn("eventload.py", ["acceptor", "--clients", "1", "--every", "0"], "DONE").ready(timeout=15)
        assert paused["inode"] not in layer.read()


# --- the layer compiled in a child: what the daemon holds ----------------------------------------------

COMPILER_LIBRARIES = re.compile(r"lib(LLVM|clang|bcc)")


def compiler_libraries(pid: int) -> set[str]:
    """The compiler's shared libraries (libLLVM, libclang-cpp, libbcc) process ``pid`` has mapped."""
    paths = {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/" in line}
    return {path for path in paths if COMPILER_LIBRARIES.search(path)}


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


HANDED_OVER = """
import json, os, sys
from aqtune.collect.ebpf import EMIT_DROPS, EventLayer
layer = EventLayer.start_in_child(emit=EMIT_DROPS)
fds = [held.fd for held in layer.tables.held]
report = {"bcc": [name for name in sys.modules if name == "bcc" or name.startswith("bcc.")],
          "kinds": sorted({held.kind for held in layer.tables.held}),
          "maps": sorted(held.name for held in layer.tables.held if held.kind == "map"),
          "inheritable": [fd for fd in fds if os.get_inheritable(fd)],
          "rings": len(layer.tables.rings), "cpus": os.cpu_count(),
          "mode": layer.mode, "status": layer.status()}
report["pause"] = None
try:
    layer.pause()
except RuntimeError as exc:
    report["pause"] = str(exc)
layer.close()
links = []
for fd in os.listdir("/proc/self/fd"):
    try:
        links.append(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:  # the directory's own descriptor, closed by now
        pass
report["bpf_fds_after_close"] = [link for link in links if link.startswith(("anon_inode:bpf", "anon_inode:[perf"))]
print(json.dumps(report))
"""


def test_a_child_compiled_layer_keeps_bcc_out_and_leaves_nothing_behind() -> None:
    """The daemon's way, in a fresh interpreter: no bcc module and no compiler library in the process,
    every descriptor close-on-exec, every map under its C name, and after close() nothing held."""
    done = subprocess.run([PYTHON, "-c", HANDED_OVER],
                          capture_output=True, text=True, timeout=300, cwd=REPO, stdin=subprocess.DEVNULL,
                          check=True)
    report = json.loads(done.stdout.splitlines()[0])
    assert report["bcc"] == []
    assert {"tracepoint", "raw_tracepoint", "program", "map", "perf_buffer"} <= set(report["kinds"])
    assert {"stats", "accepted", "peaks", "stamps", "accept_times", "events"} <= set(report["maps"])
    assert report["inheritable"] == []
    assert report["rings"] == report["cpus"]
    assert report["status"]["active"] and report["status"]["mode"] == report["mode"]
    assert "compiled in a child" in report["pause"]
    assert report["bpf_fds_after_close"] == []


def test_the_child_compiled_layer_says_what_the_in_process_one_says() -> None:
    """The same probe states, mode and value layouts whichever way the layer was compiled."""
    with EventLayer.start_in_child(emit=EMIT_DROPS) as child, EventLayer.start(emit=EMIT_DROPS) as here:
        assert child.probes == here.probes
        assert (child.mode, child.syn_overflow_seen, child.offsets_from) == (
            here.mode, here.syn_overflow_seen, here.offsets_from)
        assert child.tables.layouts == here.tables.layouts


@pytest.mark.parametrize("boot, timeout, said", [
    ("import sys; sys.stderr.write('the compiler crashed'); sys.exit(3)", 60.0,
     "exited (status 3) without handing it over: the compiler crashed"),
    ("import time; time.sleep(120)", 1.0, "did not finish within 1 s"),
    ("import socket, sys; socket.socket(fileno=int(sys.argv[2])).send(b'{not json')", 60.0, "is not JSON"),
])
def test_a_child_that_fails_is_unavailable_and_gone(boot: str, timeout: float, said: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that crashes, hangs or talks nonsense: Unavailable with what happened, the child killed
    and waited for, nothing left open. (The boot line stands in for the child's program, a real process.)"""
    fds_before, children_before = set(os.listdir("/proc/self/fd")), set(children_of(os.getpid()))
    monkeypatch.setattr(ebpf_child, "BOOT", boot)
    monkeypatch.setattr(ebpf_child, "COMPILE_TIMEOUT", timeout)
    with pytest.raises(ebpf.Unavailable, match=re.escape(said)):
        EventLayer.start_in_child(emit=EMIT_DROPS)
    assert set(children_of(os.getpid())) <= children_before  # other tests' helpers may still run
    assert set(os.listdir("/proc/self/fd")) <= fds_before


def test_a_one_page_perf_ring_wraps_around_and_counts_what_it_lost(netns: Callable[[], TestNamespace]) -> None:
    """The daemon's perf ring reader on a ring of one page per CPU (34 records), events of this test's
    namespace only: unread, a burst overflows it and the kernel's lost records are counted; read as
    it fills, more than a ring's worth passes (so the reader crosses the ring's end) and every event
    arrives, whole and in order. Each record the kernel could not write is counted lost."""
    ns = netns()
    with EventLayer.start_in_child(emit=EMIT_ALL, netns_inode=ns.inode, pages=1) as layer:
        events: list[Event] = []
        layer.on_event(events.append)
        # Unread: 64 queued connections and their accepts, 129 records of 120 bytes, on 2 CPUs' 4 KiB.
        flooded = ns.spawn("eventload.py", ["acceptor", "--clients", "64", "--every", "0"], "DONE").ready(timeout=30)
        layer.poll(0)
        kept = [e for e in events if e.inode == flooded["inode"]]
        assert 0 < len(kept) < 1 + 2 * 64
        assert {e.kind for e in kept} <= {"listen", "enqueue", "accept"} and {e.port for e in kept} == {
            flooded["port"]}
        # Read as it comes: two runs of 41 records (about 9.8 KiB), so at least one CPU's ring wraps.
        stop = threading.Event()

        def keep_reading() -> None:
            while not stop.is_set():
                layer.poll(10)

        reader = threading.Thread(target=keep_reading, name="ring-reader", daemon=True)
        reader.start()
        try:
            runs = [ns.spawn("eventload.py", ["acceptor", "--clients", "20", "--every", "0.02"], "DONE").ready(
                timeout=30) for _ in range(2)]
            for run in runs:
                inode = run["inode"]

                def of_run(inode: int = inode) -> list[Event]:
                    return [e for e in list(events) if e.inode == inode]

                wait_until(lambda: len(of_run()) >= 41, f"41 events of listener {inode}")
                mine = of_run()
                assert [e.kind for e in mine].count("accept") == 20
                assert sorted(e.queue for e in mine if e.kind == "enqueue") == list(range(1, 21))
                assert sorted(e.peer_port for e in mine if e.kind == "accept") == sorted(run["peer_ports"])
            # The kernel tells of the overflow once its ring has room again, at that CPU's next record:
            # a listen() on every CPU gives each ring one.
            record_on_every_cpu(ns)
            wait_until(lambda: layer.lost >= 1 + 2 * 64 - len(kept),
                       f"the overflow's {1 + 2 * 64 - len(kept)} lost records counted")
        finally:
            stop.set()
            reader.join(timeout=5)


def record_on_every_cpu(ns: TestNamespace) -> None:
    """One listen() in ``ns`` on each CPU in turn (its exit tracepoint runs on the calling CPU)."""
    allowed = os.sched_getaffinity(0)
    try:
        with entered(NamespaceRef(ns.name, ns.inode, f"{RUN_NETNS}/{ns.name}")):
            for cpu in sorted(allowed):
                os.sched_setaffinity(0, {cpu})
                with socket.socket() as listener:
                    listener.bind(("127.0.0.1", 0))
                    listener.listen(1)
    finally:
        os.sched_setaffinity(0, allowed)


# --- batched map deletion (after a churn of listeners) ---------------------------------------------------


def test_batched_deletion_removes_the_keys_asked_for_and_skips_missing_ones() -> None:
    """forget_closed deletes thousands of closed listeners' entries at once after a churn: by
    BPF_MAP_DELETE_BATCH, one syscall per 1,024 keys, stepping over keys that are not there (the
    kernel stops at one and says how far it got). On a real LRU hash map, as the daemon's are."""
    lru_hash, entries = 9, 4096  # BPF_MAP_TYPE_LRU_HASH
    fd = bpftables.bpf(0, ctypes.create_string_buffer(struct.pack("=IIIII", lru_hash, 8, 8, entries, 0), 72))
    try:
        m = bpftables.MapRef(fd, 8, 8)
        for key in range(3000):
            k, v = ctypes.create_string_buffer(struct.pack("=Q", key), 8), ctypes.create_string_buffer(8)
            bpftables.bpf(2, bpftables._elem_attr(fd, k, v))  # BPF_MAP_UPDATE_ELEM
        asked = [*range(0, 2500), *range(10_000, 10_050), 2600]  # 50 keys not there, two batches and more
        bpftables.map_delete_batch(m, sorted(asked))
        left = set(bpftables.map_keys(m))
        assert left == set(range(2500, 3000)) - {2600}
    finally:
        os.close(fd)

"""The metrics file as Prometheus gets it: a real prometheus-node-exporter serving it over loopback.

One test renders the file from a real sweep of sockets made to collide (two SO_REUSEPORT sockets on one
address, a Unix path bound again while the old socket listens, a hostile abstract name) and checks that
node_exporter serves every socket's series without an error; a control file with the old labels shows
that this node_exporter does report the duplicates. The other runs `aqtune run` with a textfile and
checks the served figures against ss and nstat.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from aqtune.act import metrics
from aqtune.collect.netns import NamespaceRef, entered
from aqtune.collect.sweep import sweep
from aqtune.records import COUNTERS, Snapshot
from aqtune.surfaces.publish import PUBLISH_EVERY
from tests.helpers.aqtune_run import write_policy
from tests.helpers.namespace import TestNamespace, wait_until
from tests.helpers.service import NODE_EXPORTER, NodeExporter, ServiceDaemon
from tests.integration.expect import flood_target, wait_for_queues

pytestmark = pytest.mark.integration

SO_COOKIE = 57  # not exported by the socket module on 3.11
SMALL_BACKLOG = 8  # listen(8): the accept queue holds 9
START_TIMEOUT = 60.0
SOMAXCONN = "net.core.somaxconn"
HOSTILE = 'x\nWATCHDOG_USEC=1\n"\\\x1b[2J}'  # an abstract name: newline, quote, backslash, escape, brace
GATHER_ERROR = "error gathering metrics"  # node_exporter's log line for series it dropped

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def exporter_parser() -> Any:
    if not os.access(NODE_EXPORTER, os.X_OK):
        pytest.skip(f"needs {NODE_EXPORTER} (Debian package prometheus-node-exporter)")
    return pytest.importorskip("prometheus_client.parser",
                               reason="needs python3-prometheus-client (Debian) to parse the scrape")


def parsed(parser: Any, text: str) -> Samples:
    """Samples by (name, labels); a repeated series fails, as it would in node_exporter."""
    samples: Samples = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"{key} twice"
            samples[key] = sample.value
    return samples


def cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), sys.byteorder)


def listening(stack: ExitStack, family: int, address: Any, backlog: int, reuseport: bool = False) -> socket.socket:
    sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.listen(backlog)
    return sock


@pytest.fixture
def colliding(netns: Callable[[], TestNamespace]) -> Iterator[tuple[TestNamespace, dict[str, socket.socket]]]:
    """Sockets in a fresh namespace that share every label but the socket's identity, held by this process."""
    ns = netns()
    with ExitStack() as stack:
        with entered(NamespaceRef(ns.name, ns.inode, f"/run/netns/{ns.name}")):
            first = listening(stack, socket.AF_INET, ("127.0.0.1", 0), SMALL_BACKLOG, reuseport=True)
            port = first.getsockname()[1]
            second = listening(stack, socket.AF_INET, ("127.0.0.1", port), SMALL_BACKLOG, reuseport=True)
            path = ns.unix_path("app.sock")
            old = listening(stack, socket.AF_UNIX, path, SMALL_BACKLOG)
            # Bound again, as a restarting server does: the old socket keeps the name in the kernel.
            os.unlink(path)
            new = listening(stack, socket.AF_UNIX, path, SMALL_BACKLOG)
            hostile = listening(stack, socket.AF_UNIX, "\0" + HOSTILE, 2)
        yield ns, {"first": first, "second": second, "old": old, "new": new, "hostile": hostile}


def test_node_exporter_serves_every_socket_of_a_real_sweep(
        colliding: tuple[TestNamespace, dict[str, socket.socket]], exporter_parser: Any, tmp_path: Path) -> None:
    ns, sockets = colliding
    port = sockets["first"].getsockname()[1]
    path = sockets["new"].getsockname()
    # Queued connections, so the figures are not all zeros; which sibling gets which is the kernel's hash.
    ns.flood([(f"tcp:127.0.0.1:{port}", 6), (f"unix:{path}", 3)])
    cookies = {name: cookie(sock) for name, sock in sockets.items()}

    def settled() -> Snapshot | None:
        snapshot = sweep(ns.name)
        queues = {listener.cookie: listener.queue for listener in snapshot.listeners}
        both = queues.get(cookies["first"], 0) + queues.get(cookies["second"], 0)
        return snapshot if both == 6 and queues.get(cookies["new"]) == 3 else None

    snapshot = wait_until(settled, "6 connections queued on the siblings and 3 on the new Unix socket")
    ours = {listener.cookie: listener for listener in snapshot.listeners if listener.netns == ns.name}
    assert set(cookies.values()) <= set(ours), (cookies, ours)
    assert ours[cookies["first"]].address == ours[cookies["second"]].address
    assert ours[cookies["old"]].address == ours[cookies["new"]].address == path

    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    figures = metrics.DaemonFigures(sweep_seconds=snapshot.duration, last_sweep=snapshot.taken_at,
                                    ebpf_active=False, journal_suppressed=0, journal_refused=0)
    metrics.write(str(textfiles / "aqtune.prom"), snapshot, {}, figures)
    rendered = (textfiles / "aqtune.prom").read_text(encoding="utf-8")
    parsed(exporter_parser, rendered)
    log = tmp_path / "node_exporter.log"
    exporter = NodeExporter(textfiles, log)
    try:
        served = exporter.scrape()
        assert GATHER_ERROR not in log.read_text(errors="replace"), log.read_text(errors="replace")

        # The same sockets labelled as before the socket label: this node_exporter drops one and says so.
        control = [re.sub(r',socket="\d+"', "", line).replace("aqtune_", "control_") for line in rendered.splitlines()
                   if re.match(r"(# (HELP|TYPE) )?aqtune_listener_queue[{ ]", line)]
        (textfiles / "control.prom").write_text("\n".join(control) + "\n", encoding="utf-8")
        exporter.scrape()
        wait_until(lambda: "control_listener_queue" in log.read_text(errors="replace"),
                   "node_exporter's complaint about the control file's duplicates")
        assert "collected before with the same name and label values" in log.read_text(errors="replace")
    finally:
        exporter.stop()

    samples = parsed(exporter_parser, served)
    assert samples[("node_textfile_scrape_error", ())] == 0, served
    assert samples[("node_textfile_mtime_seconds", (("file", str(textfiles / "aqtune.prom")),))] > 0
    shown = ("aqtune_listener_queue", "aqtune_listener_backlog", "aqtune_listener_fill_ratio",
             "aqtune_listener_drops_total")
    per_socket = {name: by_socket(samples, name) for name in shown}
    # Every socket is there, each once, with its own figures.
    assert set(per_socket["aqtune_listener_queue"]) == {str(c) for c in ours}
    for listener in ours.values():
        socket_label = str(listener.cookie)
        labels, queue = per_socket["aqtune_listener_queue"][socket_label]
        assert (labels["netns"], labels["proto"], labels["address"]) == (
            listener.netns, listener.proto, metrics.label_text(listener.address))
        assert queue == listener.queue
        assert per_socket["aqtune_listener_backlog"][socket_label][1] == listener.backlog
        assert per_socket["aqtune_listener_fill_ratio"][socket_label][1] == pytest.approx(listener.fill)
        if listener.drops is not None:
            assert per_socket["aqtune_listener_drops_total"][socket_label][1] == listener.drops
    hostile = per_socket["aqtune_listener_queue"][str(cookies["hostile"])][0]
    assert hostile["address"] == '@x\\nWATCHDOG_USEC=1\\n"\\\\x1b[2J}'
    (namespace,) = [n for n in snapshot.namespaces if n.name == ns.name]
    for counter in COUNTERS:
        assert samples[(metrics.COUNTER_METRICS[counter].name, (("netns", ns.name),))] == namespace.counters[counter]
    assert samples[("aqtune_netns_somaxconn", (("netns", ns.name),))] == namespace.sysctls[SOMAXCONN]
    assert samples[("aqtune_listeners", ())] == len(snapshot.listeners)
    assert samples[("aqtune_listeners_omitted", ())] == 0
    assert samples[("aqtune_last_sweep_timestamp_seconds", ())] == snapshot.taken_at


def by_socket(samples: Samples, name: str) -> dict[str, tuple[dict[str, str], float]]:
    """One per-listener metric's series by their socket label: (all labels, value)."""
    found: dict[str, tuple[dict[str, str], float]] = {}
    for (sample, pairs), value in samples.items():
        if sample == name:
            labels = dict(pairs)
            assert labels["socket"] not in found, f"{name}: socket {labels['socket']} twice"
            found[labels["socket"]] = (labels, value)
    return found


def daemon_policy(ns: str, textfile: str) -> str:
    # [apply] names the test's namespace only; the daemon runs in dry-run anyway.
    return f"""\
mode = "recommend"
interval = 0.5

[apply]
namespaces = ["{ns}"]

[metrics]
textfile = "{textfile}"
"""


def test_daemon_metrics_served_by_node_exporter_equal_ss_and_nstat(
        netns: Callable[[], TestNamespace], exporter_parser: Any, tmp_path: Path) -> None:
    ns = netns()
    helper = ns.listen(f"tcp4:{SMALL_BACKLOG}")
    (listener,) = helper.ready()["listeners"]
    address = listener["address"]
    # 3 SYNs dropped, then the flood closes its sockets: no retransmits, so every figure stays put.
    flood = ns.flood([(flood_target(listener), SMALL_BACKLOG + 4)])
    wait_for_queues(ns, {address: SMALL_BACKLOG + 1}, min_drops={address: 3})
    flood.stop()
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    prom = textfiles / "aqtune.prom"
    policy = write_policy(tmp_path / "policy.toml", daemon_policy(ns.name, str(prom)))
    exporter = NodeExporter(textfiles, tmp_path / "node_exporter.log")
    daemon = ServiceDaemon(["--config", str(policy), "--netns", ns.name, "--state-dir", str(tmp_path / "state"),
                            "--dry-run", "--no-ebpf"], tmp_path / "daemon.log", env={"AQTUNE_LOG": "console"})
    try:
        wait_until(lambda: prom.exists() or daemon.popen.poll() is not None, "aqtune.prom", timeout=START_TIMEOUT)
        assert prom.exists(), "\n".join(daemon.lines())
        before = time.time()
        rows, nstat = ns.ss_tcp(), listen_counters(ns)
        # A file written after ss and nstat read, so a stale one cannot pass.
        # Figures that stay put are rewritten every PUBLISH_EVERY, with a new timestamp.
        wait_until(lambda: (sweep_time(prom) or 0) > before, "a sweep after ss and nstat", timeout=2 * PUBLISH_EVERY)
        text = exporter.scrape()
        assert (ns.ss_tcp(), listen_counters(ns)) == (rows, nstat), "the namespace's figures moved during the scrape"
        assert daemon.stop() == 0, "\n".join(daemon.lines())
    finally:
        daemon.kill()
        exporter.stop()
    samples = parsed(exporter_parser, text)

    def value(name: str, **labels: str) -> float:
        matches = [v for (n, l), v in samples.items() if n == name and labels.items() <= dict(l).items()]
        assert len(matches) == 1, f"{name}{labels}: {len(matches)} series in {[k for k in samples if 'aqtune' in k[0]]}"
        return matches[0]

    assert value("node_textfile_scrape_error") == 0, text
    assert value("node_textfile_mtime_seconds", file=str(prom)) > 0
    labels = {"netns": ns.name, "proto": "tcp", "address": address, "socket": str(listener["cookie"])}
    row = rows[address]
    assert value("aqtune_listener_queue", **labels) == row.queue == SMALL_BACKLOG + 1
    assert value("aqtune_listener_backlog", **labels) == row.backlog == SMALL_BACKLOG
    assert value("aqtune_listener_drops_total", **labels) == row.drops
    for counter in COUNTERS:
        assert value(metrics.COUNTER_METRICS[counter].name, netns=ns.name) == nstat[counter], counter
    assert value("aqtune_netns_somaxconn", netns=ns.name) == ns.sysctls(SOMAXCONN)[SOMAXCONN]
    assert value("aqtune_ebpf_active") == 0
    assert value("aqtune_last_sweep_timestamp_seconds") > before


def listen_counters(ns: TestNamespace) -> dict[str, int]:
    """nstat's values of the TcpExt counters aqtune reports."""
    values = ns.nstat()
    return {counter: values[f"TcpExt{counter}"] for counter in COUNTERS}


def sweep_time(path: Path) -> float | None:
    match = re.search(r"^aqtune_last_sweep_timestamp_seconds (\S+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
    return float(match.group(1)) if match else None

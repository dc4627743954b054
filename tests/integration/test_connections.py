"""A listener's connections on the real kernel, and why a full queue does not drain (issue 15).

- The blog's setup for real: Apache prefork with four workers and slow clients (a partial request
  line, then nothing) holding every worker while more wait in the queue: `aqtune connections` lists
  the held connections with the workers holding them and ages from the daemon's eBPF accept times that
  match the clients' own clocks, and says held-by-connections with Apache's knobs; without eBPF it
  still proves the connections long-held from tcp_info.
- nginx with `reuseport` and two workers, one stopped: its socket fills while its sibling drains, and
  reuseport-stalled names the stopped worker.
- collect() against ss: a kernel port filter over several ports, IPv6, a Unix path bound again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aqtune.collect import connections, procfs
from aqtune.collect import netns as namespaces
from aqtune.collect.sweep import sweep
from aqtune.decide import servers as table
from aqtune.decide.connections import held_by_connections, reuseport_stalled
from aqtune.decide.findings import FindingId
from aqtune.decide.policy import parse
from aqtune.model.groups import reuseport_groups
from tests.helpers import servers
from tests.helpers.aqtune_run import Daemon, aqtune, write_policy
from tests.helpers.namespace import PYTHON, REPO, TestNamespace, wait_until
from tests.helpers.service import wait_for_state
from tests.integration.expect import listeners_in, wait_for_queues

pytestmark = pytest.mark.integration

WORKERS = 4
BACKLOG = 2  # full at 3: the kernel admits backlog + 1
SLOW = WORKERS + BACKLOG + 1
LONG_AFTER = 2.0
IDLE_AFTER = 1.0
CLOCK_TOLERANCE = 1.0  # seconds between a client's connect() returning and aqtune's accept time
POLICY = f"""\
mode = "recommend"
interval = 0.5

[saturation]
sustain = 1

[connections]
long_after = {LONG_AFTER:g}
idle_after = {IDLE_AFTER:g}
"""


@pytest.fixture
def ebpf_daemon(netns: Callable[[], TestNamespace], tmp_path: Path) -> Iterator[tuple[TestNamespace, Path, Path]]:
    """`aqtune run --dry-run` with eBPF on a fresh namespace: (namespace, policy file, state directory)."""
    ns = netns()
    policy = write_policy(tmp_path / "policy.toml", POLICY)
    state = tmp_path / "state"
    daemon = Daemon(["--config", str(policy), "--netns", ns.name, "--state-dir", str(state), "--dry-run"],
                    tmp_path / "daemon.log")
    try:
        document = wait_for_state(state, daemon, timeout=60)
        if not document["ebpf"]["active"]:
            pytest.skip(f"eBPF is not available here: {document['ebpf']['mode']}")
        yield ns, policy, state
    finally:
        daemon.stop()


def connections_json(ns: TestNamespace, *args: str) -> dict[str, Any]:
    done = aqtune("connections", "--netns", ns.name, "--json", *args)
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


@contextlib.contextmanager
def slow_clients(ns: TestNamespace, address: str, count: int) -> Iterator[list[dict[str, Any]]]:
    helper = ns.spawn("slowclients.py", ["--to", address, "--count", str(count), "--hold", "60"], "SLOW")
    try:
        yield helper.ready(timeout=30)["clients"]
    finally:
        helper.stop()


def test_slow_clients_holding_apache_prefork_workers(ebpf_daemon: tuple[TestNamespace, Path, Path],
                                                     tmp_path: Path) -> None:
    ns, policy, state = ebpf_daemon
    with servers.start(ns, "apache", backlog=BACKLOG, mpm="prefork", children=str(WORKERS)) as apache, \
            slow_clients(ns, apache.address, SLOW) as clients:
        workers = apache.pids() - {apache.pid}
        assert len(workers) == WORKERS
        wait_for_queues(ns, {apache.address: BACKLOG + 1})
        # mod_reqtimeout (header=20) closes them after 20 s: the look comes well before, once they are
        # older than long_after.
        document = wait_until(
            lambda: (d := connections_json(ns, "--port", "8080", "--config", str(policy), "--state-dir", str(state)))
            and d["listeners"][0]["summary"]["long_held"] == WORKERS and d,
            f"{WORKERS} connections older than {LONG_AFTER} s", timeout=15, interval=0.5)
        assert document["ages"] == "ebpf"
        (entry,) = document["listeners"]
        summary = entry["summary"]
        assert (summary["accepted"], summary["queued"], summary["held"]) == (WORKERS, BACKLOG + 1, WORKERS)
        assert set(summary["held_by"]) == workers
        # Every held connection is listed with the worker holding it, and its age is the client's own.
        connected_at = {c["port"]: c["connected_at"] for c in clients}
        listed = entry["connections"]
        assert len(listed) == WORKERS and entry["more"] == 0
        for row in listed:
            port = int(row["peer"].rpartition(":")[2])
            assert row["holders"][0]["pid"] in workers and row["holders"][0]["comm"] == "apache2"
            assert abs(row["accepted_at"] - connected_at[port]) < CLOCK_TOLERANCE, (row, connected_at[port])
            assert row["age_s"] >= LONG_AFTER and row["idle_s"] >= IDLE_AFTER and row["long_held"]
            assert row["bytes_out"] == 0 and row["bytes_in"] == len("GET / HTTP/1.1\r\nHost: loc")
        advice = {a["id"]: a for a in entry["advice"]}
        held = advice[FindingId.HELD_BY_CONNECTIONS]
        assert "RequestReadTimeout" in held["text"] and "KeepAliveTimeout" in held["text"], held["text"]
        assert held["evidence"]["workers"] == held["evidence"]["occupied"] == WORKERS

        # The table, as a person sees it: the worker's pid on each row.
        done = aqtune("connections", "--netns", ns.name, "--listener", apache.address, "--config", str(policy),
                      "--state-dir", str(state))
        assert done.returncode == 0, done.stderr
        assert "[held-by-connections]" in done.stdout and "from the daemon's eBPF accept times" in done.stdout
        assert all(str(pid) in done.stdout for pid in workers), done.stdout

        # Without the daemon's accept times tcp_info still proves them long-held: the server never
        # answered, so the time since it last sent runs from the handshake.
        blind = connections_json(ns, "--port", "8080", "--config", str(policy), "--state-dir", str(tmp_path / "none"))
        assert blind["ages"] == "none" and "no aqtune daemon runs" in blind["ages_note"]
        (entry,) = blind["listeners"]
        assert entry["summary"]["long_held"] == WORKERS
        assert all(row["age_s"] is None and row["age_at_least_s"] >= LONG_AFTER for row in entry["connections"])
        assert FindingId.HELD_BY_CONNECTIONS in {a["id"] for a in entry["advice"]}

        # The pure path the daemon takes (collect.connections.summarize, then the finding).
        snapshot = sweep(ns.name)
        listener = listeners_in(snapshot, ns.name)[apache.address]
        summary_of = connections.summarize(snapshot.namespaces, [listener], LONG_AFTER, IDLE_AFTER)
        found = held_by_connections(listener, summary_of[(ns.name, listener.cookie)],
                                    table.identify(listener.processes), parse(POLICY))
        assert found is not None and found.id is FindingId.HELD_BY_CONNECTIONS


def test_a_stopped_nginx_reuseport_worker_fills_only_its_socket(netns: Callable[[], TestNamespace]) -> None:
    ns = netns()
    with servers.start(ns, "nginx", backlog=4, reuseport="1", workers="2") as nginx:
        found = listeners_in_group(ns, nginx.address)
        assert len(found) == 2 and len({l.cookie for l in found}) == 2
        # nginx's workers inherit every socket of the group; each one's epoll set watches its own alone.
        serving = connections.serving(found)
        own = {l.cookie: serving[l.inode] for l in found}
        assert all(len(pids) == 1 for pids in own.values()) and set.union(*own.values()) == nginx.pids() - {nginx.pid}
        stuck_cookie, (stuck_pid,) = next(iter(own.items()))
        os.kill(stuck_pid, signal.SIGSTOP)
        try:
            flood = ns.flood([(f"tcp:{nginx.address}", 40)], hold=30)
            try:
                def settled() -> list[Any] | None:
                    group = listeners_in_group(ns, nginx.address)
                    full = [l for l in group if l.cookie == stuck_cookie and l.queue == 5]
                    return group if full else None

                group = wait_until(settled, "the stopped worker's socket full", timeout=10)
                stuck = next(l for l in group if l.cookie == stuck_cookie)
                sibling = next(l for l in group if l.cookie != stuck_cookie)
                assert sibling.queue == 0  # its worker accepted every connection hashed to it
                policy = parse(POLICY)
                finding = reuseport_stalled(stuck, group, policy, connections.serving(group))
                assert finding is not None and finding.id is FindingId.REUSEPORT_STALLED
                assert f"pid {stuck_pid} (nginx)" in finding.text and f"pid {nginx.pid} " not in finding.text
                assert reuseport_stalled(sibling, group, policy) is None
                # status shows both sockets, each its own row, as one group.
                done = aqtune("status", "--json", "--sweep", "--netns", ns.name, "--state-dir", "/nonexistent")
                assert done.returncode == 0, done.stderr
                rows = [l for l in json.loads(done.stdout)["listeners"] if l["address"] == nginx.address]
                assert {r["cookie"] for r in rows} == {l.cookie for l in group}
                assert all(r["group"] == {"address": nginx.address, "members": 2} for r in rows)
                # The running worker's connections are listed as the group's, held by it.
                document = connections_json(ns, "--port", "8080", "--all", "--state-dir", "/nonexistent")
                entries = document["listeners"]
                assert len(entries) == 2 and all(e["summary"]["shared"] == 2 for e in entries)
                holders = {h["pid"] for e in entries for c in e["connections"] for h in c["holders"]}
                assert stuck_pid not in holders and holders <= nginx.pids()
            finally:
                flood.stop()
        finally:
            os.kill(stuck_pid, signal.SIGCONT)


def listeners_in_group(ns: TestNamespace, address: str) -> list[Any]:
    snapshot = sweep(ns.name)
    groups = reuseport_groups(snapshot.listeners)
    return groups.get((ns.name, "tcp", address), [])


HOLDER = r"""
import json, os, socket, sys
d = sys.argv[1]
held = []
def listener(family, address, backlog=8):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind(address); s.listen(backlog); held.append(s); return s
def pair(l, family, address):
    c = socket.socket(family, socket.SOCK_STREAM); c.connect(address); a, _ = l.accept(); held.extend([c, a])
    return {"server": os.fstat(a.fileno()).st_ino, "client": os.fstat(c.fileno()).st_ino}
out = {"pid": os.getpid()}
a = listener(socket.AF_INET, ("127.0.0.1", 9001)); b = listener(socket.AF_INET, ("0.0.0.0", 9002))
v6 = listener(socket.AF_INET6, ("::1", 9003))
out["a"] = [pair(a, socket.AF_INET, ("127.0.0.1", 9001)) for _ in range(2)]
out["b"] = [pair(b, socket.AF_INET, ("127.0.0.2", 9002))]
out["v6"] = [pair(v6, socket.AF_INET6, ("::1", 9003))]
path = d + "/app.sock"
old = listener(socket.AF_UNIX, path)
out["old"] = [pair(old, socket.AF_UNIX, path)]
os.unlink(path)
new = listener(socket.AF_UNIX, path)  # bound again while the old one still listens
out["new"] = [pair(new, socket.AF_UNIX, path)]
out["inodes"] = {"old": os.fstat(old.fileno()).st_ino, "new": os.fstat(new.fileno()).st_ino}
print("HELD " + json.dumps(out), flush=True)
sys.stdin.read()
"""


def test_collect_matches_each_connection_to_its_listener(netns: Callable[[], TestNamespace]) -> None:
    ns = netns()
    helper = subprocess.Popen(ns.exec_args(PYTHON, "-c", HOLDER, str(ns.sockdir)), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert helper.stdout is not None
        line = helper.stdout.readline()
        assert line.startswith("HELD "), line
        held = json.loads(line[5:])
        snapshot = sweep(ns.name, owners=False)
        found = {l.address: l for l in snapshot.listeners if l.proto != "unix"}
        by_inode = {l.inode: l for l in snapshot.listeners}
        wanted = [found["127.0.0.1:9001"], found["0.0.0.0:9002"], found["[::1]:9003"],
                  by_inode[held["inodes"]["old"]], by_inode[held["inodes"]["new"]]]
        refs = namespaces.select_namespaces(namespaces.list_namespaces(), ns.name)
        collected = connections.collect(refs, wanted)
        assert collected.errors == {}
        expected = {"127.0.0.1:9001": "a", "0.0.0.0:9002": "b", "[::1]:9003": "v6"}
        for listener in wanted:
            name = expected.get(listener.address) or ("old" if listener.inode == held["inodes"]["old"] else "new")
            got = collected.connections[(ns.name, listener.cookie)]
            assert {c.inode for c in got} == {p["server"] for p in held[name]}, name
            assert all(c.holders and c.holders[0].pid == held["pid"] for c in got)
            if listener.proto == "unix":
                assert {c.peer_inode for c in got} == {p["client"] for p in held[name]}
            else:
                assert all(c.recv_idle is not None and c.bytes_in == 0 for c in got)
        # ss, filtered the same way, sees the same server-side connections on those ports.
        ss = ns.run("ss", "-tnHe", "state", "established", "( sport = :9001 or sport = :9002 or sport = :9003 )")
        ss_inodes = {int(word[4:]) for word in ss.split() if word.startswith("ino:")}
        ours = {c.inode for key, got in collected.connections.items() for c in got if c.proto != "unix"}
        assert ours == ss_inodes
        assert procfs.find_owners(ours)  # the fd scan sees them too
    finally:
        if helper.stdin is not None:
            helper.stdin.close()
        helper.wait(timeout=10)

"""Real servers from Debian's packages, each in its own namespace: aqtune's figures against `ss`, and
the server table (aqtune.decide.servers) against what the server really does — who it is, the
backlog it asks for by default and through its knob, its workers, and whether a reload re-listens."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

import pytest

from aqtune.collect.procfs import OwnerCache
from aqtune.collect.sweep import sweep
from aqtune.decide import servers as table
from aqtune.records import Listener
from tests.helpers import servers
from tests.helpers.namespace import TestNamespace, wait_until
from tests.integration.expect import assert_matches_ss, listeners_in, wait_for_queues

pytestmark = pytest.mark.integration

SOMAXCONN = 4096  # above every default below, so each shows as asked for
QUEUED = 3  # connections left waiting while the server is stopped
CONFIGURED = 300


def postgres_backlog(max_connections: int) -> int:
    """What PostgreSQL passes listen(): 2 x MaxBackends up to 16, 2 x max_connections from 17."""
    found = sorted(glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        pytest.skip("PostgreSQL is not installed: install Debian's postgresql (make test-deps does)")
    version = subprocess.run([found[-1], "--version"], capture_output=True, text=True, check=True).stdout
    major = int(re.search(r"(\d+)\.", version).group(1))  # type: ignore[union-attr]
    # autovacuum_max_workers 3 + 1 + max_worker_processes 8 + max_wal_senders 10, the defaults
    return 2 * (max_connections + 3 + 1 + 8 + 10) if major <= 16 else 2 * max_connections


@dataclass(frozen=True)
class Case:
    kind: str  # tests/helpers/servers.py's name for it
    key: str  # the table entry it must be identified as
    default_backlog: int | Callable[[], int]  # what it asks listen() for with no backlog configured
    knob: str  # how backlog_knob_text(…, CONFIGURED) must name its knob
    default_text: str  # and its default
    workers: int | None = None  # workers counted from the process tree (children of the master)
    options: dict[str, str] = field(default_factory=dict)


CASES = [
    Case("nginx", "nginx", 511, f"backlog={CONFIGURED}", "default 511", workers=2),
    Case("apache", "apache-prefork", 511, f"ListenBacklog {CONFIGURED}", "default 511", workers=2,
         options={"mpm": "prefork"}),
    Case("apache", "apache-event", 511, f"ListenBacklog {CONFIGURED}", "default 511", workers=2,
         options={"mpm": "event"}),
    Case("php-fpm", "php-fpm", SOMAXCONN, f"listen.backlog = {CONFIGURED}", "as much as somaxconn allows",
         workers=2),
    # HAProxy asks for the frontend's maxconn (50 in the helper's configuration).
    Case("haproxy", "haproxy", 50, f"backlog {CONFIGURED}", "the frontend's maxconn"),
    Case("redis", "redis", 511, f"tcp-backlog {CONFIGURED}", "default 511"),
    Case("gunicorn", "gunicorn", 2048, f"--backlog {CONFIGURED}", "default 2048", workers=2),
    # The helper's uWSGI has "gunicorn" on its command line (issue 14's trap).
    Case("uwsgi", "uwsgi", 100, f"--listen {CONFIGURED}", "default 100", workers=2),
    Case("postgresql", "postgresql", lambda: postgres_backlog(5), "no backlog setting", "2 x MaxBackends",
         options={"max_connections": "5"}),
    Case("node", "node", 511, f"backlog: {CONFIGURED}", "default 511"),
]


def case_id(case: Case) -> str:
    return case.key


def stalled_listener(ns: TestNamespace, server: servers.RealServer) -> tuple[Listener, int]:
    """Stop the server, queue QUEUED connections on it, and read it with aqtune between two `ss` reads."""
    server.signal_all(signal.SIGSTOP)
    target = f"unix:{server.address}" if server.launch.unix else f"tcp:{server.address}"
    flood = ns.flood([(target, QUEUED)], hold=30)
    before = wait_for_queues(ns, {server.address: QUEUED})[server.address]
    snapshot = sweep(ns.name)
    after = ns.ss_all()[server.address]
    flood.stop()  # the clients hang up, so the server's shutdown has no connection to wait for
    listener = listeners_in(snapshot, ns.name)[server.address]
    assert_matches_ss(listener, before, after)
    return listener, listener.backlog


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_default_backlog_identity_and_knob(netns: Callable[[], TestNamespace], case: Case) -> None:
    ns = netns()
    ns.set_sysctl("net.core.somaxconn", SOMAXCONN)
    with servers.start(ns, case.kind, **case.options) as server:
        listener, backlog = stalled_listener(ns, server)
        expected = case.default_backlog() if callable(case.default_backlog) else case.default_backlog
        assert backlog == expected, f"{case.kind} asked for {backlog} by default, the table says {expected}"
        assert listener.queue == QUEUED
        assert {p.pid for p in listener.processes} == server.pids()

        identified = table.identify(listener.processes)
        assert identified.key == case.key, f"{case.kind} identified as {identified.key}: {listener.processes}"
        text = table.backlog_knob_text(identified, CONFIGURED)
        assert case.knob in text and case.default_text in text, text
        if case.workers is not None:
            assert len(table.workers(identified, listener.processes)) == case.workers
        # Without a unit, the advice names the server and its master's pid, never "gunicorn" for uWSGI.
        relisten = table.relisten_text(identified, listener.processes)
        assert f"{identified.name} (pid " in relisten, relisten
        if case.key == "uwsgi":
            assert "gunicorn" not in text + relisten + table.worker_knob_text(identified)


@pytest.mark.parametrize("case", [c for c in CASES if c.kind != "postgresql" and c.key != "apache-event"],
                         ids=case_id)
def test_the_knob_the_table_names_sets_the_backlog(netns: Callable[[], TestNamespace], case: Case) -> None:
    ns = netns()
    ns.set_sysctl("net.core.somaxconn", SOMAXCONN)
    with servers.start(ns, case.kind, backlog=CONFIGURED, **case.options) as server:
        listener = listeners_in(sweep(ns.name), ns.name)[server.address]
        assert listener.backlog == ns.ss_all()[server.address].backlog == CONFIGURED


def test_postgresql_backlog_follows_max_connections(netns: Callable[[], TestNamespace]) -> None:
    ns = netns()
    with servers.start(ns, "postgresql", max_connections="10") as server:
        listener = listeners_in(sweep(ns.name), ns.name)[server.address]
        assert listener.backlog == ns.ss_tcp()[server.address].backlog == postgres_backlog(10)


@pytest.mark.parametrize(("kind", "reload"), [
    ("nginx", signal.SIGHUP),  # what `nginx -s reload` sends the master
    ("haproxy", signal.SIGUSR2),  # what Debian's unit sends the master on `systemctl reload`
])
def test_a_reload_keeps_the_old_backlog_as_the_table_says(netns: Callable[[], TestNamespace], kind: str,
                                                          reload: int) -> None:
    ns = netns()
    ns.set_sysctl("net.core.somaxconn", 64)
    with servers.start(ns, kind, backlog=1000) as server:
        assert ns.ss_tcp()[server.address].backlog == 64
        ns.set_sysctl("net.core.somaxconn", 512)
        old = server.pids()
        os.kill(server.pid, reload)
        # The reload is done when new workers hold the listener.
        wait_until(lambda: server.pids() and not server.pids() & (old - {server.pid}),
                   f"{kind} to reload", timeout=10)
        assert ns.ss_tcp()[server.address].backlog == 64
        identified = table.identify(listen_processes(ns, server.address))
        assert identified.relisten == table.RESTART
        assert table.relisten_text(identified, ()).startswith("restart")
    with servers.start(ns, kind, backlog=1000) as server:
        assert ns.ss_tcp()[server.address].backlog == 512  # a restart re-listens under the new somaxconn


def listen_processes(ns: TestNamespace, address: str) -> tuple[table.Process, ...]:
    return listeners_in(sweep(ns.name), ns.name)[address].processes


def test_apache_prefork_with_php_fpm_serves_a_slow_script(netns: Callable[[], TestNamespace]) -> None:
    # The blog's setup (issue 15): Apache prefork in front of php-fpm on a Unix socket.
    ns = netns()
    with servers.start(ns, "php-fpm", children="2") as fpm, \
            servers.start(ns, "apache", mpm="prefork", php_socket=fpm.address) as apache:
        reply = ns.run(sys.executable, "-c",
                       "import urllib.request as u; print(u.urlopen("
                       f"'http://{apache.address}/slow.php?s=0.2', timeout=10).read().decode(), end='')")
        assert reply == "ok\n"
        found = listeners_in(sweep(ns.name), ns.name)
        apache_server = table.identify(found[apache.address].processes)
        fpm_server = table.identify(found[fpm.address].processes)
        assert (apache_server.key, fpm_server.key) == ("apache-prefork", "php-fpm")
        assert "RequestReadTimeout" in table.hold_knob_text(apache_server)
        assert "request_terminate_timeout" in table.hold_knob_text(fpm_server)
        assert "pm.max_children" in table.worker_knob_text(fpm_server)


EXEC_LATER = """
import os, socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 8081))
s.listen(8)
os.set_inheritable(s.fileno(), True)
print("listening", flush=True)
sys.stdin.readline()
os.execv("/bin/sleep", ["sleep", "30"])
"""


def test_owner_names_follow_exec(netns: Callable[[], TestNamespace]) -> None:
    # issue 14: the owner cache kept a process's old name after exec.
    ns = netns()
    child = subprocess.Popen(ns.exec_args(sys.executable, "-c", EXEC_LATER), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "listening\n"
        cache = OwnerCache(max_age=3600, min_gap=3600)  # never rescans: only exec-following can update it
        before = listeners_in(sweep(ns.name, owner_cache=cache), ns.name)["127.0.0.1:8081"].processes
        assert [(p.pid, p.comm) for p in before] == [(child.pid, "python3")]
        child.stdin.write("exec\n")
        child.stdin.flush()
        comm = Path(f"/proc/{child.pid}/comm")
        wait_until(lambda: comm.read_text() == "sleep\n", "the exec")
        after = listeners_in(sweep(ns.name, owner_cache=cache), ns.name)["127.0.0.1:8081"].processes
        assert [(p.pid, p.comm, p.exe, p.cmdline) for p in after] == [(child.pid, "sleep", "sleep", "sleep 30")]
    finally:
        child.kill()
        child.wait(timeout=5)


FORKS = """
import os, socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 8083))
s.listen(8)
print("listening", flush=True)
sys.stdin.readline()
worker = os.fork()
if worker == 0:
    sys.stdin.readline()  # the parent is gone by then: it ends when the test closes the pipe
    os._exit(0)
print(worker, flush=True)
sys.stdin.readline()
"""


def test_owner_cache_finds_a_forked_worker_and_drops_the_parent_without_full_scans(
        netns: Callable[[], TestNamespace]) -> None:
    # issue 16: a prefork server's new worker is found by the next lookup, by reading only new processes.
    ns = netns()
    parent = subprocess.Popen(ns.exec_args(sys.executable, "-c", FORKS), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        assert parent.stdout is not None and parent.stdin is not None
        assert parent.stdout.readline() == "listening\n"
        inode = listeners_in(sweep(ns.name, owners=False), ns.name)["127.0.0.1:8083"].inode
        cache = OwnerCache(max_age=3600, min_gap=3600, full_every=3600)  # one full scan: the first lookup
        assert [p.pid for p in cache.lookup({inode}, now=0)[inode]] == [parent.pid]
        parent.stdin.write("fork\n")
        parent.stdin.flush()
        worker_pid = int(parent.stdout.readline())
        worker = os.pidfd_open(worker_pid)
        assert sorted(p.pid for p in cache.lookup({inode}, now=1)[inode]) == sorted([parent.pid, worker_pid])
        parent.terminate()
        parent.wait(timeout=5)
        assert [p.pid for p in cache.lookup({inode}, now=2)[inode]] == [worker_pid]
        assert cache.full_scans == 1
    finally:
        parent.kill()
        parent.wait(timeout=5)
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):  # it ended with the pipe
                signal.pidfd_send_signal(worker, signal.SIGKILL)
            os.close(worker)


ACTIVATED = """
import socket, sys, time
listener = socket.socket(fileno=3)  # SD_LISTEN_FDS_START
print("activated", flush=True)
sys.stdin.readline()
"""


def test_a_socket_activated_server_is_advised_as_a_socket_unit(netns: Callable[[], TestNamespace]) -> None:
    # systemd-socket-activate listens, waits for the first connection, then execs the server with
    # LISTEN_FDS/LISTEN_PID as systemd would: the listener's backlog is the socket's, not the server's.
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate (Debian's systemd package) is not installed")
    ns = netns()
    address = "127.0.0.1:8082"
    child = subprocess.Popen(ns.exec_args(tool, "-l", address, sys.executable, "-c", ACTIVATED),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        wait_until(lambda: address in ns.ss_tcp(), "systemd-socket-activate to listen")
        waiting = listeners_in(sweep(ns.name), ns.name)[address].processes
        assert [p.socket_activated for p in waiting] == [False]  # the tool itself, before any connection
        ns.flood([(f"tcp:{address}", 1)], hold=10)
        assert child.stdout.readline() == "activated\n"
        processes = listeners_in(sweep(ns.name), ns.name)[address].processes
        assert [(p.pid, p.socket_activated, p.app) for p in processes] == [(child.pid, True, "")]
        identified = table.identify(processes)
        assert identified is table.SYSTEMD_SOCKET
        assert "Backlog=1024" in table.backlog_knob_text(identified, 1024)
        assert ".socket unit" in table.relisten_text(identified, processes)
    finally:
        child.kill()
        child.wait(timeout=5)


def test_a_user_unit_named_nginx_is_never_nginx_service(netns: Callable[[], TestNamespace]) -> None:
    # issue 12: `systemd-run --user --unit=nginx` showed as nginx.service and got root's restart advice.
    # The same cgroup path, made by hand under a private directory of systemd's v1 hierarchy.
    hierarchy = Path("/sys/fs/cgroup/systemd")
    if not (hierarchy / "cgroup.procs").exists():
        pytest.skip("needs the cgroup v1 name=systemd hierarchy to place a process by hand; under cgroup v2 "
                    "systemd owns the tree (the nspawn tier runs systemd-run --user there)")
    base = hierarchy / f"aqt-{os.getpid()}"
    leaf = base / "user.slice/user-1000.slice/user@1000.service/app.slice/nginx.service"
    leaf.mkdir(parents=True)
    ns = netns()
    try:
        with servers.start(ns, "nginx") as server:
            for pid in server.pids():
                (leaf / "cgroup.procs").write_text(f"{pid}\n")
            processes = listeners_in(sweep(ns.name), ns.name)[server.address].processes
            assert {(p.unit, p.user_unit) for p in processes} == {(None, "nginx.service")}
            identified = table.identify(processes)
            assert identified is table.NGINX  # it is nginx, but not the system's nginx.service
            text = table.relisten_text(identified, processes)
            assert "systemctl --user restart nginx.service" in text
            assert "`systemctl restart" not in text
            for pid in server.pids():
                (hierarchy / "cgroup.procs").write_text(f"{pid}\n")
    finally:
        for directory in sorted((d for d in base.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
            directory.rmdir()
        base.rmdir()

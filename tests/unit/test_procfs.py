"""/proc parsing: TcpExt counters, the systemd unit of a cgroup path, and socket owners in a fake /proc."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from aqtune.collect import procfs
from aqtune.collect.fdwalk import socket_holders
from aqtune.collect.procfs import (
    CMDLINE_MAX,
    TRUNCATED,
    OwnerCache,
    Placement,
    app_from_argv,
    describe_process,
    find_owners,
    parse_netstat,
    parse_socket_activation,
    parse_stat,
    placement_from_cgroup,
    unit_from_cgroup,
)
from aqtune.records import COUNTERS, Process
from tests.unit.fixture_data import expected, netstat_text

# --- parse_netstat --------------------------------------------------------------------------------------


def test_tcpext_matches_nstat_read_at_the_same_moment() -> None:
    # netstat.txt is the capture namespace's /proc/net/netstat; nstat read it right after.
    assert parse_netstat(netstat_text()) == expected()["nstat_tcpext"]


def test_listen_overflow_counters_of_the_capture() -> None:
    counters = parse_netstat(netstat_text())
    assert counters["ListenOverflows"] == counters["ListenDrops"] == 2  # two SYNs dropped on port 19002
    assert set(COUNTERS) <= set(counters)


def test_other_sections_are_not_mixed_in() -> None:
    text = netstat_text()
    assert parse_netstat(text, section="IpExt") == expected()["nstat_ipext"]
    assert "InOctets" not in parse_netstat(text)
    assert "ListenOverflows" not in parse_netstat(text, section="MPTcpExt")
    # "Ip" must not match the "IpExt:" lines.
    assert parse_netstat(text, section="Ip") == {}


@pytest.mark.parametrize("text", ["", "garbage\n", "TcpExt: ListenOverflows ListenDrops\n"])
def test_missing_section_or_value_line_gives_nothing(text: str) -> None:
    assert parse_netstat(text) == {}


# --- unit_from_cgroup -----------------------------------------------------------------------------------

V1_CONTROLLERS = "12:cpuset:/\n11:memory:/system.slice/nginx.service\n4:cpu,cpuacct:/system.slice/nginx.service\n"


@pytest.mark.parametrize(("text", "unit"), [
    pytest.param("0::/system.slice/nginx.service\n", "nginx.service", id="v2"),
    pytest.param(V1_CONTROLLERS + "1:name=systemd:/system.slice/nginx.service\n", "nginx.service", id="v1"),
    pytest.param(V1_CONTROLLERS + "1:name=systemd:/system.slice/nginx.service\n0::/system.slice/nginx.service\n",
                 "nginx.service", id="hybrid"),
    pytest.param("1:name=systemd:/system.slice/old.service\n0::/system.slice/new.service\n", "new.service",
                 id="hybrid-v2-wins"),
    pytest.param("0::/machine.slice/machine-web.scope/payload/system.slice/nginx.service\n", "nginx.service",
                 id="nested-container"),  # the container's own unit; placement marks it as the container's
    pytest.param("0::/system.slice/docker-0123abcd.scope\n", "docker-0123abcd.scope", id="container-scope"),
    pytest.param("0::/system.slice/foo.service/worker\n", "foo.service", id="delegated-subgroup"),
    pytest.param("0::/system.slice/foo.service/a/b/c\n", "foo.service", id="delegated-deep"),
    # A user manager's units are the user's to name: never the system manager's unit.
    pytest.param("0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-firefox-42.scope\n",
                 None, id="user-app-scope"),
    pytest.param("0::/user.slice/user-1000.slice/user@1000.service/app.slice/syncthing.service\n",
                 None, id="user-service"),
    pytest.param("0::/user.slice/user-1000.slice/user@1000.service/init.scope\n", None, id="user-manager"),
    pytest.param("0::/user.slice/user-1000.slice/session-3.scope\n", "session-3.scope", id="login-session"),
    pytest.param("0::/system.slice/sshd.socket\n", "sshd.socket", id="socket-unit"),
    pytest.param("0::/init.scope\n", "init.scope", id="pid1"),
    pytest.param("0::/\n", None, id="root"),
    pytest.param("0::/user.slice/user-1000.slice\n", None, id="slice-only"),
    pytest.param("0::/lxc.payload.web/sys\n", None, id="no-systemd"),
    pytest.param("", None, id="empty"),
    pytest.param("1:name=systemd:/\n", None, id="v1-root"),
])
def test_unit_from_cgroup(text: str, unit: str | None) -> None:
    assert unit_from_cgroup(text) == unit


def test_v1_host_with_cgroup2_mounted_somewhere_keeps_the_systemd_unit() -> None:
    # On a cgroup v1 (legacy) host the kernel prints "0::/" for every process as soon as anything mounts
    # cgroup2 (container runtimes and BPF tools do); systemd's placement is still the name=systemd line.
    # This machine's own /proc/self/cgroup has exactly this shape (9:name=systemd:/ ... 0::/).
    text = V1_CONTROLLERS + "1:name=systemd:/system.slice/nginx.service\n0::/\n"
    assert unit_from_cgroup(text) == "nginx.service"


@pytest.mark.parametrize(("path", "placement"), [
    pytest.param("/system.slice/nginx.service", Placement("nginx.service"), id="system-unit"),
    pytest.param("/user.slice/user-1000.slice/user@1000.service/app.slice/nginx.service",
                 Placement(None, user_unit="nginx.service"), id="systemd-run-user-unit-nginx"),
    pytest.param("/user.slice/user-1000.slice/user@1000.service/app.slice/app.slice/x/nginx.service",
                 Placement(None, user_unit="nginx.service"), id="user-deep"),
    pytest.param("/user.slice/user-1000.slice/user@1000.service/init.scope",
                 Placement(None, user_unit="init.scope"), id="user-manager"),
    pytest.param("/user.slice/user-1000.slice/user@1000.service", Placement(None), id="user-manager-root"),
    pytest.param("/user.slice/user-1000.slice/session-3.scope", Placement("session-3.scope"), id="login-session"),
    pytest.param("/machine.slice/machine-web.scope/payload/system.slice/nginx.service",
                 Placement("nginx.service", container="machine-web.scope"), id="nspawn-container-unit"),
    pytest.param("/machine.slice/machine-web.scope/payload/user.slice/user-0.slice/user@0.service/app.slice/a.service",
                 Placement("a.service", container="machine-web.scope"), id="container-user-unit"),
    pytest.param("/machine.slice/machine-web.scope/payload",
                 Placement("machine-web.scope", container="machine-web.scope"), id="nspawn-payload"),
    pytest.param("/system.slice/docker-0123abcd.scope", Placement("docker-0123abcd.scope",
                                                                  container="docker-0123abcd.scope"), id="docker"),
    pytest.param("/machine.slice/libpod-89ab.scope/container", Placement("libpod-89ab.scope",
                                                                         container="libpod-89ab.scope"), id="podman"),
    pytest.param("/system.slice/systemd-nspawn@web.service/payload/system.slice/redis-server.service",
                 Placement("redis-server.service", container="systemd-nspawn@web.service"), id="nspawn-service"),
    pytest.param("/system.slice/foo.service/worker", Placement("foo.service"), id="delegated-subgroup"),
    pytest.param("/init.scope", Placement("init.scope"), id="pid1"),
    pytest.param("/", Placement(None), id="root"),
])
def test_placement_from_cgroup(path: str, placement: Placement) -> None:
    assert placement_from_cgroup(f"0::{path}\n") == placement


# --- stat, argv, environment -------------------------------------------------------------------------


def test_parse_stat_with_a_comm_made_of_parentheses_and_spaces() -> None:
    stat = ("4242 (a) b (c)) S 4200 4242 4242 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 5 0 123456 1000 10 "
            + " ".join(["0"] * 30))
    parsed = parse_stat(stat)
    assert parsed is not None
    assert (parsed.comm, parsed.ppid, parsed.threads, parsed.starttime, parsed.cpu_ticks) == \
        ("a) b (c)", 4200, 5, 123456, 10)


def test_parse_stat_of_garbage_is_none() -> None:
    assert parse_stat("") is None
    assert parse_stat("1 (x) S 0") is None


@pytest.mark.parametrize(("exe", "argv", "app"), [
    ("python3.11", ["/usr/bin/python3", "/usr/bin/gunicorn", "--bind", ":8000", "app:app"], "gunicorn"),
    ("python3.11", ["/srv/venv/bin/python", "/srv/venv/bin/gunicorn", "app:app"], "gunicorn"),
    ("python3.11", ["python3", "-m", "uvicorn", "app:app"], "uvicorn"),
    ("python3.11", ["python3", "-um", "gunicorn.app.wsgiapp", "app:app"], "gunicorn"),
    ("python3.11", ["python3", "-mgunicorn", "app:app"], "gunicorn"),
    ("python3.11", ["python3", "-W", "ignore", "-X", "dev", "srv.py", "gunicorn"], "srv.py"),
    ("python3.11", ["python3", "-Wignore", "srv.py"], "srv.py"),
    ("python3.11", ["python3", "-c", "import gunicorn"], ""),
    ("python3.11", ["python3", "-uc", "import gunicorn"], ""),
    ("python3.11", ["python3", "-"], ""),
    ("python3.11", ["python3", "--", "srv.py"], "srv.py"),
    ("python3.11", ["python3"], ""),
    ("python3.11", ["gunicorn: master [app:app]"], "gunicorn"),  # setproctitle rewrote argv
    ("nodejs", ["node", "--require", "dotenv/config", "--max-old-space-size=512", "server.js"], "server.js"),
    ("node", ["node", "-e", "require('http').createServer().listen(80)"], ""),
    ("php8.2", ["php", "-d", "x=1", "-f", "/srv/worker.php"], "worker.php"),
    ("php8.2", ["php", "-S", "127.0.0.1:80"], ""),
    # Not interpreters: the executable is the identity, whatever the arguments say.
    ("uwsgi-core", ["uwsgi", "--module", "gunicorn"], ""),
    ("nginx", ["nginx: master process"], ""),
    ("python3.11", [], ""),
])
def test_app_from_argv(exe: str, argv: list[str], app: str) -> None:
    assert app_from_argv(exe, argv) == app


def test_app_names_are_bounded() -> None:
    assert len(app_from_argv("python3", ["python3", "x" * 5000])) == 64


@pytest.mark.parametrize(("environ", "activated"), [
    (b"PATH=/bin\0LISTEN_PID=42\0LISTEN_FDS=1\0LISTEN_FDNAMES=web\0", True),
    (b"LISTEN_FDS=2\0LISTEN_PID=42\0", True),
    (b"LISTEN_FDS=1\0LISTEN_PID=41\0", False),  # inherited by a child: passed to its parent
    (b"LISTEN_FDS=0\0LISTEN_PID=42\0", False),
    (b"LISTEN_FDS=x\0LISTEN_PID=42\0", False),
    (b"LISTEN_PID=42\0", False),
    (b"XLISTEN_FDS=1\0LISTEN_PID=42\0", False),
    (b"", False),
])
def test_socket_activation_from_the_environment(environ: bytes, activated: bool) -> None:
    assert parse_socket_activation(42, environ, truncated=False) == activated


def test_a_cut_environment_entry_is_not_trusted() -> None:
    # LISTEN_PID=4 cut from LISTEN_PID=42 by the read bound must not match pid 4.
    assert not parse_socket_activation(4, b"LISTEN_FDS=1\0LISTEN_PID=4", truncated=True)
    assert parse_socket_activation(4, b"LISTEN_FDS=1\0LISTEN_PID=4\0PA", truncated=True)


# --- socket_holders / find_owners on a fake /proc -------------------------------------------------------


def _process(proc: Path, pid: int, fds: dict[int, str], comm: str = "srv",
             cgroup: str = "0::/system.slice/srv.service\n") -> None:
    base = proc / str(pid)
    (base / "fd").mkdir(parents=True)
    for fd, target in fds.items():
        os.symlink(target, base / "fd" / str(fd))
    (base / "comm").write_text(comm + "\n")
    (base / "cmdline").write_bytes(f"/usr/bin/{comm}\0--flag\0".encode())
    (base / "cgroup").write_text(cgroup)
    (base / "stat").write_text(_stat(pid, comm))


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    nginx = "0::/system.slice/nginx.service\n"
    _process(tmp_path, 10, {0: "/dev/null", 3: "socket:[1000]", 4: "socket:[1000]", 5: "socket:[2000]"},
             comm="nginx", cgroup=nginx)
    _process(tmp_path, 11, {3: "socket:[1000]", 4: "pipe:[77]"}, comm="nginx", cgroup=nginx)
    _process(tmp_path, 12, {3: "socket:[3000]", 7: "anon_inode:[eventfd]"}, comm="other", cgroup="0::/\n")
    (tmp_path / "self").mkdir()  # non-numeric entries are not processes
    (tmp_path / "13").mkdir()  # a process whose fd directory vanished (exited) or is unreadable
    return tmp_path


def test_holders_of_shared_and_single_sockets(proc: Path) -> None:
    holders = socket_holders({1000, 2000, 4242}, str(proc))
    assert {inode: sorted(pids) for inode, pids in holders.items()} == {1000: [10, 11], 2000: [10]}


def test_a_pid_with_two_fds_on_one_socket_is_listed_once(proc: Path) -> None:
    assert sorted(socket_holders({1000}, str(proc))[1000]) == [10, 11]


def test_no_inodes_means_no_scan(proc: Path) -> None:
    assert socket_holders(set(), str(proc)) == {}


def test_find_owners_describes_each_process(proc: Path) -> None:
    owners = find_owners({1000, 3000}, str(proc))
    nginx = sorted(owners[1000], key=lambda p: p.pid)
    assert nginx == [Process(10, "nginx", "/usr/bin/nginx --flag", "nginx.service", ppid=1, threads=1, starttime=5000),
                     Process(11, "nginx", "/usr/bin/nginx --flag", "nginx.service", ppid=1, threads=1, starttime=5000)]
    assert owners[3000] == (Process(12, "other", "/usr/bin/other --flag", None, ppid=1, threads=1, starttime=5000),)



def test_sockets_of_one_set_of_holders_share_one_owner_tuple(proc: Path) -> None:
    """A server's sockets share their owners' tuple, which status encodes once for all of them."""
    _process(proc, 14, {3: "socket:[5000]", 4: "socket:[6000]", 5: "socket:[7000]"}, comm="haproxy")
    owners = find_owners({5000, 6000, 7000, 2000}, str(proc))
    assert owners[5000] is owners[6000] is owners[7000]
    assert [p.pid for p in owners[5000]] == [14] and [p.pid for p in owners[2000]] == [10]

def test_a_process_that_exits_between_scan_and_describe_is_left_out(proc: Path) -> None:
    (proc / "11" / "comm").unlink()
    owners = find_owners({1000}, str(proc))
    assert [p.pid for p in owners[1000]] == [10]


def _stat(pid: int, comm: str, ppid: int = 1, threads: int = 1, starttime: int = 5000) -> str:
    fields = ["S", str(ppid)] + ["0"] * 15 + [str(threads), "0", str(starttime)] + ["0"] * 30
    return f"{pid} ({comm}) " + " ".join(fields) + "\n"


def _program(proc: Path, pid: int, comm: str, exe: str, argv: list[str], *, ppid: int = 1, threads: int = 1,
             starttime: int = 5000, environ: bytes = b"") -> None:
    """Make fake /proc/PID look like a process running ``exe`` (what exec leaves behind)."""
    base = proc / str(pid)
    base.mkdir(exist_ok=True)
    (base / "comm").write_text(comm + "\n")
    (base / "stat").write_text(_stat(pid, comm, ppid, threads, starttime))
    (base / "cmdline").write_bytes(b"".join(arg.encode() + b"\0" for arg in argv))
    (base / "environ").write_bytes(environ)
    if (base / "exe").is_symlink():
        (base / "exe").unlink()
    os.symlink(exe, base / "exe")


def test_describe_process_reads_exe_app_activation_parent_threads_and_start(proc: Path) -> None:
    _program(proc, 10, "gunicorn", "/usr/bin/python3.11", ["/usr/bin/python3", "/usr/bin/gunicorn", "app:app"],
             ppid=9, threads=3, starttime=777, environ=b"LISTEN_FDS=1\0LISTEN_PID=10\0")
    described = describe_process(10, str(proc))
    assert described == Process(10, "gunicorn", "/usr/bin/python3 /usr/bin/gunicorn app:app", "nginx.service",
                                exe="python3.11", app="gunicorn", socket_activated=True, ppid=9, threads=3,
                                starttime=777)


def test_a_deleted_executable_keeps_its_name(proc: Path) -> None:
    _program(proc, 10, "nginx", "/usr/sbin/nginx (deleted)", ["nginx: master process"])
    described = describe_process(10, str(proc))
    assert described is not None and described.exe == "nginx"


def test_a_long_command_line_is_cut_and_marked(proc: Path) -> None:
    _program(proc, 10, "srv", "/usr/bin/srv", ["/usr/bin/srv", "x" * (10 * CMDLINE_MAX)])
    described = describe_process(10, str(proc))
    assert described is not None
    assert described.cmdline.endswith(TRUNCATED)
    assert len(described.cmdline) <= CMDLINE_MAX + len(TRUNCATED)


def test_a_user_unit_is_not_a_system_unit(proc: Path) -> None:
    (proc / "12" / "cgroup").write_text("0::/user.slice/user-1000.slice/user@1000.service/app.slice/nginx.service\n")
    described = describe_process(12, str(proc))
    assert described is not None
    assert (described.unit, described.user_unit) == (None, "nginx.service")


def test_owner_cache_follows_exec_between_scans(proc: Path) -> None:
    _program(proc, 12, "sh", "/usr/bin/dash", ["/bin/sh", "/srv/start.sh"], starttime=900)
    cache = OwnerCache(max_age=3600, min_gap=3600, proc=str(proc))
    assert [p.comm for p in cache.lookup({3000}, now=0)[3000]] == ["sh"]
    # The wrapper exec's the server, which keeps the inherited socket: same pid, same start time.
    _program(proc, 12, "redis-server", "/usr/bin/redis-check-rdb", ["/usr/bin/redis-server", "*:6379"], starttime=900)
    owner = cache.lookup({3000}, now=1)[3000]
    assert [(p.comm, p.exe, p.cmdline) for p in owner] == [("redis-server", "redis-check-rdb",
                                                            "/usr/bin/redis-server *:6379")]


def test_owner_cache_keeps_an_unchanged_process_as_it_is(proc: Path) -> None:
    _program(proc, 12, "srv", "/usr/bin/srv", ["/usr/bin/srv"], starttime=900)
    cache = OwnerCache(max_age=3600, min_gap=3600, proc=str(proc))
    first = cache.lookup({3000}, now=0)[3000]
    assert cache.lookup({3000}, now=1)[3000][0] is first[0]


def test_owner_cache_drops_a_pid_reused_by_another_process(proc: Path) -> None:
    _program(proc, 12, "srv", "/usr/bin/srv", ["/usr/bin/srv"], starttime=900)
    cache = OwnerCache(max_age=3600, min_gap=3600, proc=str(proc))
    assert len(cache.lookup({3000}, now=0)[3000]) == 1
    _program(proc, 12, "srv", "/usr/bin/srv", ["/usr/bin/srv"], starttime=901)
    assert cache.lookup({3000}, now=1)[3000] == ()


def test_owner_cache_drops_an_exited_holder(proc: Path) -> None:
    cache = OwnerCache(max_age=3600, min_gap=3600, proc=str(proc))
    assert sorted(p.pid for p in cache.lookup({1000}, now=0)[1000]) == [10, 11]
    for name in ("comm", "cmdline", "cgroup", "stat"):
        (proc / "11" / name).unlink()
    assert [p.pid for p in cache.lookup({1000}, now=1)[1000]] == [10]


# --- the owner cache reads only what changed (issue 16) -------------------------------------------------


def _pids(owners: dict[int, tuple[Process, ...]], inode: int) -> list[int]:
    return [p.pid for p in owners.get(inode, ())]


def _quiet_cache(proc: Path, **periods: float) -> OwnerCache:
    """A cache whose full scans and fd re-checks happen only when a test asks for them."""
    settings = {"max_age": 3600.0, "min_gap": 3600.0, "full_every": 3600.0} | periods
    return OwnerCache(proc=str(proc), **settings)


def test_owner_cache_finds_a_new_process_without_a_full_scan(proc: Path) -> None:
    cache = _quiet_cache(proc)
    assert _pids(cache.lookup({1000}, now=0), 1000) == [10, 11]
    _process(proc, 20, {5: "socket:[1000]"}, comm="worker")  # a prefork server's new worker
    _process(proc, 21, {5: "socket:[9999]"}, comm="bystander")
    owners = cache.lookup({1000}, now=1)
    assert _pids(owners, 1000) == [10, 11, 20]
    assert owners[1000][2].comm == "worker"
    assert cache.full_scans == 1
    assert cache.pid_scans == 2  # each new pid once
    cache.lookup({1000}, now=2)
    assert cache.pid_scans == 2



def test_owner_cache_forgets_closed_sockets_at_once_after_a_complete_sweep(proc: Path) -> None:
    """Sockets a sweep over budget did not track are kept for max_age (the next sweep may track
    them); after a sweep that tracked every listener, the ones not asked for are closed and go now:
    under a churn of thousands of listeners the cache holds those of now, not of the last minute."""
    cache = _quiet_cache(proc)
    cache.lookup({1000, 2000, 3000}, now=0)
    cache.lookup({1000}, now=1)  # a partial sweep: the others may be tracked again
    assert set(cache._asked) == {1000, 2000, 3000}
    owners = cache.lookup({1000, 3000}, now=2, complete=True)
    assert set(cache._asked) == {1000, 3000} and 2000 not in owners
    assert 2000 not in cache._holders[10].fds and _pids(owners, 3000) == [12]

def test_owner_cache_drops_a_holder_whose_pid_is_gone(proc: Path) -> None:
    cache = _quiet_cache(proc)
    assert _pids(cache.lookup({1000}, now=0), 1000) == [10, 11]
    shutil.rmtree(proc / "11")
    assert _pids(cache.lookup({1000}, now=1), 1000) == [10]
    assert cache.full_scans == 1


def test_owner_cache_rechecks_a_holders_fd_at_max_age(proc: Path) -> None:
    cache = _quiet_cache(proc, max_age=30)
    assert _pids(cache.lookup({1000, 2000}, now=0), 1000) == [10, 11]
    (proc / "11" / "fd" / "3").unlink()  # pid 11 closed its only fd on 1000 ...
    os.symlink("/dev/null", proc / "11" / "fd" / "3")  # ... and the number was reused
    assert _pids(cache.lookup({1000, 2000}, now=1), 1000) == [10, 11]  # between re-checks: as it was
    owners = cache.lookup({1000, 2000}, now=30)
    assert _pids(owners, 1000) == [10]
    assert _pids(owners, 2000) == [10]
    assert cache.full_scans == 1


def test_owner_cache_finds_a_socket_moved_to_another_fd(proc: Path) -> None:
    cache = _quiet_cache(proc, max_age=30)
    cache.lookup({1000}, now=0)
    remembered = next(fd for fd in (3, 4) if (proc / "10" / "fd" / str(fd)).is_symlink())
    (proc / "10" / "fd" / str(remembered)).unlink()  # pid 10 still holds 1000 on its other fd
    os.symlink("socket:[1000]", proc / "10" / "fd" / "9")
    assert _pids(cache.lookup({1000}, now=30), 1000) == [10, 11]
    assert cache.pid_scans == 1  # that pid's fds only
    for fd in (3, 4, 9):
        if (proc / "10" / "fd" / str(fd)).is_symlink():
            (proc / "10" / "fd" / str(fd)).unlink()
    assert _pids(cache.lookup({1000}, now=60), 1000) == [11]
    assert cache.full_scans == 1


def test_owner_cache_scans_everything_for_new_sockets_at_most_every_min_gap(proc: Path) -> None:
    cache = _quiet_cache(proc, min_gap=5)
    cache.lookup({1000}, now=0)
    assert cache.lookup({1000}, now=1) and cache.full_scans == 1
    # A new listener, held by a process seen before: only a full scan can find it.
    assert _pids(cache.lookup({1000, 3000}, now=2), 3000) == []
    assert cache.full_scans == 1
    assert _pids(cache.lookup({1000, 3000}, now=5), 3000) == [12]
    assert cache.full_scans == 2
    cache.lookup({1000, 3000}, now=20)
    assert cache.full_scans == 2  # all known: no more full scans


def test_owner_cache_shows_a_new_socket_of_a_new_process_before_the_full_scan(proc: Path) -> None:
    cache = _quiet_cache(proc, min_gap=5)
    cache.lookup({1000}, now=0)
    _process(proc, 20, {3: "socket:[4000]"})
    assert _pids(cache.lookup({1000, 4000}, now=1), 4000) == [20]
    assert cache.full_scans == 1


def test_owner_cache_rescans_everything_every_full_every(proc: Path) -> None:
    cache = _quiet_cache(proc, full_every=600)
    cache.lookup({3000}, now=0)
    os.symlink("socket:[3000]", proc / "10" / "fd" / "8")  # handed over SCM_RIGHTS to a process seen before
    assert _pids(cache.lookup({3000}, now=599), 3000) == [12]
    assert _pids(cache.lookup({3000}, now=600), 3000) == [10, 12]
    assert cache.full_scans == 2


def test_owner_cache_bounds_the_new_processes_read_per_lookup(proc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procfs, "SCAN_PIDS_PER_LOOKUP", 2)
    cache = _quiet_cache(proc)
    cache.lookup({1000}, now=0)
    for pid in range(20, 25):
        _process(proc, pid, {3: "socket:[1000]"})
    # Two more each lookup (in listing order: a real /proc lists by pid, a tmp directory as it likes).
    assert len(cache.lookup({1000}, now=1)[1000]) == 4
    assert len(cache.lookup({1000}, now=2)[1000]) == 6
    assert _pids(cache.lookup({1000}, now=3), 1000) == [10, 11, 20, 21, 22, 23, 24]
    assert cache.pid_scans == 5


def test_owner_cache_forgets_sockets_no_longer_asked_for(proc: Path) -> None:
    cache = _quiet_cache(proc, max_age=30, full_every=600)
    cache.lookup({1000, 3000}, now=0)
    assert set(cache.lookup({1000}, now=10)) == {1000, 3000}  # asked lately: a sweep may rotate
    assert set(cache.lookup({1000}, now=600)) == {1000}  # at the full scan
    cache.lookup({1000, 3000}, now=601)
    assert set(cache.lookup({2000}, now=640)) == {2000}  # or when the set asked for moves


def test_owner_cache_takes_a_reused_pid_for_the_newcomer(proc: Path) -> None:
    _program(proc, 12, "srv", "/usr/bin/srv", ["/usr/bin/srv"], starttime=900)
    cache = _quiet_cache(proc)
    assert [p.comm for p in cache.lookup({3000}, now=0)[3000]] == ["srv"]
    # It exited; its pid now names a process that holds the socket too (made aside first, so that its
    # directory gets another inode, as procfs gives a new process).
    heir = proc / "aside"
    _process(heir, 12, {4: "socket:[3000]"}, comm="heir")
    _program(heir, 12, "heir", "/usr/bin/heir", ["/usr/bin/heir"], starttime=901)
    shutil.rmtree(proc / "12")
    (heir / "12").rename(proc / "12")
    assert [(p.comm, p.starttime) for p in cache.lookup({3000}, now=1)[3000]] == [("heir", 901)]
    assert cache.full_scans == 1

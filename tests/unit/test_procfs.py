"""/proc parsing: TcpExt counters, the systemd unit of a cgroup path, and socket owners in a fake /proc."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aqtune.collect.procfs import find_owners, parse_netstat, socket_holders, unit_from_cgroup
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
                 id="nested-container"),
    pytest.param("0::/system.slice/docker-0123abcd.scope\n", "docker-0123abcd.scope", id="container-scope"),
    pytest.param("0::/system.slice/foo.service/worker\n", "foo.service", id="delegated-subgroup"),
    pytest.param("0::/system.slice/foo.service/a/b/c\n", "foo.service", id="delegated-deep"),
    pytest.param("0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-firefox-42.scope\n",
                 "app-gnome-firefox-42.scope", id="user-app-scope"),
    pytest.param("0::/user.slice/user-1000.slice/user@1000.service/app.slice/syncthing.service\n",
                 "syncthing.service", id="user-service"),
    pytest.param("0::/user.slice/user-1000.slice/user@1000.service/init.scope\n", "init.scope", id="user-manager"),
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
    assert nginx == [Process(10, "nginx", "/usr/bin/nginx --flag", "nginx.service"),
                     Process(11, "nginx", "/usr/bin/nginx --flag", "nginx.service")]
    assert owners[3000] == (Process(12, "other", "/usr/bin/other --flag", None),)


def test_a_process_that_exits_between_scan_and_describe_is_left_out(proc: Path) -> None:
    (proc / "11" / "comm").unlink()
    owners = find_owners({1000}, str(proc))
    assert [p.pid for p in owners[1000]] == [10]

"""What root acts on must be root's: the change ledger and live state another user planted, a new
namespace that reused a dead one's inode, and namespaces named and followed by identity.

The other users here are real: an unprivileged test user (created for the session if the host has
none), and user namespaces it creates with `unshare -rn`. Each test failed before issue 12's state
and namespace-identity fixes (findings 7 and 8) and issue 14's item 7.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aqtune.act import sysctl
from aqtune.act.ledger import FORMAT_VERSION, Ledger
from aqtune.collect import netns as aq_netns
from aqtune.collect.sweep import sweep
from tests.helpers.aqtune_run import Daemon, aqtune, ledger_changes, write_policy
from tests.helpers.namespace import HELPERS, PYTHON, HelperProcess, TestNamespace, wait_until

pytestmark = pytest.mark.integration

SOMAXCONN = "net.core.somaxconn"
TEST_USER = "aqtune-test"
REUSE_TRIES = 60  # new namespaces created at most while waiting for the kernel to reuse an inode
PROCESS_LIFE = "60"  # seconds any helper process here lives at most


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int

    def command(self, *args: str) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *args]


@pytest.fixture(scope="session")
def test_user() -> Iterator[User]:
    """An unprivileged user; created for the session (and removed after) only if the host has none."""
    if shutil.which("setpriv") is None or shutil.which("useradd") is None:
        pytest.skip("needs setpriv (util-linux) and useradd (passwd) to act as an unprivileged user")
    created = False
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        done = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                              capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        created = done.returncode == 0
        if not created:
            with contextlib.suppress(KeyError):  # another session made it meanwhile
                pwd.getpwnam(TEST_USER)
                created = False
    entry = pwd.getpwnam(TEST_USER)
    yield User(TEST_USER, entry.pw_uid, entry.pw_gid)
    if created:
        subprocess.run(["userdel", TEST_USER], capture_output=True, timeout=30, stdin=subprocess.DEVNULL)


@pytest.fixture
def processes() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts processes that are killed after the test, whatever its outcome."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(list(args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=5)


@pytest.fixture
def user_dir(test_user: User) -> Iterator[Path]:
    """A directory under /tmp owned by the test user, as that user would make one."""
    path = Path(tempfile.mkdtemp(prefix="aqt-forged-", dir="/tmp"))
    os.chown(path, test_user.uid, test_user.gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def somaxconn_of(path: str) -> int:
    return sysctl.read_in(aq_netns.NamespaceRef("test", os.stat(path).st_ino, path), SOMAXCONN)


def netns_inode(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    return None


def one_line_error(done: subprocess.CompletedProcess[str], command: str) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"aqtune {command}: "), done.stderr
    return done.stderr


# --- a planted ledger ------------------------------------------------------------------------------------


def test_rollback_refuses_a_ledger_another_user_planted(
        netns: Callable[[], TestNamespace], test_user: User, user_dir: Path) -> None:
    ns = netns()
    before = ns.sysctls(SOMAXCONN)[SOMAXCONN]
    # Well-formed, and about a namespace that really is the one named: only its origin is wrong.
    forged = {"version": FORMAT_VERSION, "changes": [{
        "netns": ns.name, "netns_inode": ns.inode, "sysctl": SOMAXCONN, "original": 77, "applied": before,
        "pending": None, "changed_at": 0, "cookie": aq_netns.cookie_of(f"/run/netns/{ns.name}")}]}
    subprocess.run(test_user.command(PYTHON, "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
                                     str(user_dir / "changes.json"), json.dumps(forged)),
                   check=True, timeout=30, stdin=subprocess.DEVNULL)

    error = one_line_error(aqtune("rollback", "--state-dir", str(user_dir)), "rollback")
    assert f"{user_dir} is owned by uid {test_user.uid}, not root" in error
    assert f"chown root:root {user_dir}" in error
    assert ns.sysctls(SOMAXCONN)[SOMAXCONN] == before

    # status only reads: it goes on without the ledger, and says why.
    done = aqtune("status", "--json", "--netns", ns.name, "--state-dir", str(user_dir))
    assert done.returncode == 0 and f"owned by uid {test_user.uid}" in done.stderr, done.stderr


def test_rollback_checks_every_record_before_writing_any(netns: Callable[[], TestNamespace], tmp_path: Path) -> None:
    ns = netns()
    before = ns.sysctls(SOMAXCONN)[SOMAXCONN]
    good = {"netns": ns.name, "netns_inode": ns.inode, "sysctl": SOMAXCONN, "original": 77, "applied": before,
            "pending": None, "changed_at": 0, "cookie": aq_netns.cookie_of(f"/run/netns/{ns.name}")}
    bad = {**good, "sysctl": "net.ipv4.tcp_max_syn_backlog", "applied": "1\nkernel.core_pattern = |/tmp/x"}
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    (state / "changes.json").write_text(json.dumps({"version": FORMAT_VERSION, "changes": [good, bad]}))
    os.chmod(state / "changes.json", 0o600)

    error = one_line_error(aqtune("rollback", "--state-dir", str(state)), "rollback")
    assert "changes.json: change 1: applied: must be an integer" in error
    assert ns.sysctls(SOMAXCONN)[SOMAXCONN] == before, "nothing is written when any record is wrong"


# --- a forged live state ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("daemon", "says"), [
    ({"pid": 1, "interval": 1.0}, "does not name the process that wrote it"),
    ({"pid": 1, "pid_start": 0, "interval": 1.0, "future": True}, "in the future"),
])
def test_status_does_not_show_a_forged_live_state(
        netns: Callable[[], TestNamespace], tmp_path: Path, daemon: dict[str, Any], says: str) -> None:
    ns = netns()
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    forged = {"source": "daemon", "taken_at": time.time() + (3600 if daemon.pop("future", False) else 0),
              "listeners": [], "namespaces": [{"name": ns.name, "inode": ns.inode}], "daemon": daemon}
    (state / "status.json").write_text(json.dumps(forged))
    done = aqtune("status", "--json", "--netns", ns.name, "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["source"] == "sweep"
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_status_ignores_a_live_state_in_a_directory_another_user_owns(
        netns: Callable[[], TestNamespace], test_user: User, user_dir: Path) -> None:
    ns = netns()
    forged = {"source": "daemon", "taken_at": time.time(), "listeners": [], "namespaces": [],
              "daemon": {"pid": os.getpid(), "pid_start": 0, "interval": 1.0}}
    (user_dir / "status.json").write_text(json.dumps(forged))
    done = aqtune("status", "--json", "--netns", ns.name, "--state-dir", str(user_dir))
    assert done.returncode == 0 and json.loads(done.stdout)["source"] == "sweep"
    assert f"owned by uid {test_user.uid}" in done.stderr, done.stderr


# --- inode reuse -----------------------------------------------------------------------------------------


def user_namespace(test_user: User, start: Callable[..., subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """A user namespace of the test user's, held by a process: made *before* the inode to be reused
    is freed, since a user namespace takes an inode number from the same pool."""
    owner = start(*test_user.command("unshare", "-r", "sleep", PROCESS_LIFE))
    wait_until(lambda: settled(owner), "the test user's user namespace")
    return owner


def namespace_reusing(inode: int, test_user: User, owner: subprocess.Popen[bytes], value: int,
                      start: Callable[..., subprocess.Popen[bytes]]) -> subprocess.Popen[bytes] | None:
    """A network namespace the test user creates in its user namespace ``owner`` (somaxconn set to
    ``value`` in it) that got ``inode``; None if the kernel handed out other inodes meanwhile.

    The kernel gives the lowest free inode number: other namespaces' freed numbers below ours are
    filled by the first tries, which stay alive until ours comes up, then go.
    """
    script = f"echo {value} > /proc/sys/net/core/somaxconn && exec sleep {PROCESS_LIFE}"
    tries: list[subprocess.Popen[bytes]] = []
    found = None
    for _ in range(REUSE_TRIES):
        process = start(*test_user.command("nsenter", "--preserve-credentials", f"--user=/proc/{owner.pid}/ns/user",
                                           "--", "unshare", "-n", "sh", "-c", script))
        got = wait_until(lambda p=process: netns_inode(p.pid) if settled(p) else None,
                         "the test user's namespace", timeout=10)
        if got == inode:
            found = process
            break
        tries.append(process)
        time.sleep(0.05)  # a namespace's inode is freed by a kernel worker, a moment after its last process
    for process in tries:
        process.kill()
        process.wait(timeout=5)
    return found


def settled(process: subprocess.Popen[bytes]) -> bool:
    """The process got as far as its final `sleep` (unshare and nsenter exec it)."""
    try:
        with open(f"/proc/{process.pid}/comm") as f:
            return f.read().strip() == "sleep"
    except OSError:
        return False


def test_rollback_leaves_a_new_namespace_that_reused_the_inode_alone(
        netns: Callable[[], TestNamespace], test_user: User, tmp_path: Path,
        processes: Callable[..., subprocess.Popen[bytes]]) -> None:
    ns = netns()
    state = str(tmp_path / "state")
    ledger = Ledger(state)
    (ref,) = aq_netns.select_namespaces(aq_netns.list_namespaces(), ns.name)
    before = ns.sysctls(SOMAXCONN)[SOMAXCONN]
    sysctl.apply_change(ledger, ref, SOMAXCONN, before, before * 2)
    (entry,) = ledger_changes(tmp_path / "state") or []
    assert entry["cookie"] == ref.cookie is not None
    inode = ns.inode
    owner = user_namespace(test_user, processes)
    ns.destroy()

    # Another user's namespace gets the dead one's inode, with somaxconn at the value aqtune had set.
    reused = namespace_reusing(inode, test_user, owner, before * 2, processes)
    if reused is None:
        pytest.skip(f"the kernel did not hand inode {inode} to any of {REUSE_TRIES} new namespaces "
                    "(other namespaces were being created meanwhile)")
    assert somaxconn_of(f"/proc/{reused.pid}/ns/net") == before * 2

    assert [e.netns_inode for e in Ledger(state).stale(aq_netns.list_namespaces(book=None))] == [inode]
    done = aqtune("rollback", "--state-dir", state)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert line.split()[0] == "gone" and f"inode {inode} now belongs to another namespace" in line, line
    assert somaxconn_of(f"/proc/{reused.pid}/ns/net") == before * 2, "another user's value was changed"
    assert ledger_changes(tmp_path / "state") == []


def test_a_write_never_lands_in_a_namespace_that_replaced_the_one_listed(
        test_user: User, tmp_path: Path, processes: Callable[..., subprocess.Popen[bytes]]) -> None:
    first = processes("unshare", "-n", "sleep", PROCESS_LIFE)
    inode = wait_until(lambda: netns_inode(first.pid) if settled(first) else None, "a namespace")
    (ref,) = aq_netns.select_namespaces(aq_netns.list_namespaces(), f"pid:{first.pid}")
    owner = user_namespace(test_user, processes)
    first.kill()
    first.wait(timeout=5)
    reused = namespace_reusing(inode, test_user, owner, 4321, processes)
    if reused is None:
        pytest.skip(f"the kernel did not hand inode {inode} to any of {REUSE_TRIES} new namespaces")
    # The same inode through a path that opens the new namespace: the cookie tells them apart.
    stale = aq_netns.NamespaceRef(ref.name, inode, f"/proc/{reused.pid}/ns/net", ref.cookie)
    with pytest.raises(aq_netns.NamespaceGone, match="now belongs to another namespace"):
        sysctl.apply_change(Ledger(str(tmp_path / "state")), stale, SOMAXCONN, 4321, 8642)
    assert somaxconn_of(f"/proc/{reused.pid}/ns/net") == 4321
    assert ledger_changes(tmp_path / "state") in (None, [])


# --- who owns a namespace --------------------------------------------------------------------------------


def test_a_namespace_a_user_namespace_owns_is_marked_with_its_creator(
        netns: Callable[[], TestNamespace], test_user: User, processes: Callable[..., subprocess.Popen[bytes]]) -> None:
    ns = netns()
    theirs = processes(*test_user.command("unshare", "-rn", "sleep", PROCESS_LIFE))
    inode = wait_until(lambda: netns_inode(theirs.pid) if settled(theirs) else None, "their namespace")
    refs = {ref.inode: ref for ref in aq_netns.list_namespaces()}
    assert (refs[inode].user_owned, refs[inode].owner_uid) == (True, test_user.uid)
    assert (refs[ns.inode].user_owned, refs[ns.inode].owner_uid) == (False, None)
    assert not next(ref for ref in refs.values() if ref.name == "host").user_owned
    (seen,) = sweep(f"pid:{theirs.pid}", owners=False).namespaces
    assert (seen.user_owned, seen.owner_uid, seen.cookie) == (True, test_user.uid, refs[inode].cookie)


# --- names and selections that follow the namespace ------------------------------------------------------


def test_a_name_stays_with_its_namespace_and_any_pid_selects_it(
        processes: Callable[..., subprocess.Popen[bytes]]) -> None:
    first = processes("unshare", "-n", "sleep", PROCESS_LIFE)
    inode = wait_until(lambda: netns_inode(first.pid) if settled(first) else None, "a namespace")
    second = processes("nsenter", f"--net=/proc/{first.pid}/ns/net", "sleep", PROCESS_LIFE)
    wait_until(lambda: netns_inode(second.pid) == inode and settled(second), "the second process")
    name = f"pid:{first.pid}"
    assert [ref.name for ref in aq_netns.list_namespaces() if ref.inode == inode] == [name]

    selection = aq_netns.resolve_selection(f"pid:{second.pid}")
    assert (selection.inode, selection.name) == (inode, name)
    first.kill()
    first.wait(timeout=5)
    # The namespace lives on in the second process, under the same name.
    (ref,) = [ref for ref in aq_netns.list_namespaces() if ref.inode == inode]
    assert (ref.name, ref.path) == (name, f"/proc/{second.pid}/ns/net")
    assert [ns.inode for ns in sweep(selection, owners=False).namespaces] == [inode]
    assert [ns.inode for ns in sweep(name, owners=False).namespaces] == [inode]

    second.kill()
    second.wait(timeout=5)
    with pytest.raises(LookupError, match="no longer exists"):
        aq_netns.select_namespaces(aq_netns.list_namespaces(), selection)


def test_status_shows_the_daemons_namespace_for_any_pid_in_it_after_the_first_exits(
        tmp_path: Path, processes: Callable[..., subprocess.Popen[bytes]]) -> None:
    listener = HelperProcess(["unshare", "-n", "sh", "-c",
                              f'ip link set lo up && exec {PYTHON} {HELPERS / "listen.py"} --listen tcp4:4 '
                              f'--life {PROCESS_LIFE}'], "READY")
    daemon: Daemon | None = None
    try:
        (announced,) = listener.ready()["listeners"]
        inode = netns_inode(listener.pid)
        assert inode is not None
        other = processes("nsenter", f"--net=/proc/{listener.pid}/ns/net", "sleep", PROCESS_LIFE)
        wait_until(lambda: netns_inode(other.pid) == inode and settled(other), "a second process")
        state = tmp_path / "state"
        policy = write_policy(tmp_path / "policy.toml", 'interval = 0.2\n')
        daemon = Daemon(["--config", str(policy), "--netns", f"pid:{listener.pid}", "--state-dir", str(state),
                         "--dry-run", "--no-ebpf"], tmp_path / "run.log")

        def status_by(pid: int) -> dict[str, Any] | None:
            done = aqtune("status", "--json", "--netns", f"pid:{pid}", "--state-dir", str(state))
            assert done.returncode == 0, done.stderr
            document: dict[str, Any] = json.loads(done.stdout)
            return document if document["source"] == "daemon" else None

        live = wait_until(lambda: status_by(other.pid), "the daemon's state", timeout=20, interval=0.2)
        assert [l["address"] for l in live["listeners"]] == [announced["address"]]
        assert [ns["inode"] for ns in live["namespaces"]] == [inode]

        # The process the daemon was started with exits; the namespace lives on in the other one.
        listener.stop()
        started = time.time()
        later = wait_until(lambda: (d := status_by(other.pid)) and d["taken_at"] > started + 0.5 and d,
                           "a sweep after the first process exited", timeout=20, interval=0.2)
        assert [ns["inode"] for ns in later["namespaces"]] == [inode]
        assert daemon.count("sweep failed") == 0, "\n".join(daemon.lines())
    finally:
        if daemon is not None:
            daemon.kill()
        listener.close()


@pytest.fixture
def system_unit_cgroup() -> Iterator[tuple[str, Path]]:
    """A cgroup where a system unit's would be (system.slice/aqt-PID.service) in the hierarchy systemd
    uses here (cgroup v2, or v1's name=systemd); removed after the test."""
    mounts = aq_netns._cgroup_mounts()
    own = aq_netns._cgroup_path(os.getpid(), "/proc")
    kind = own[0] if own else ("v2" if "v2" in mounts and not os.path.isdir("/sys/fs/cgroup/systemd") else "v1")
    if kind not in mounts:
        pytest.skip(f"no cgroup hierarchy for systemd units is mounted here ({mounts})")
    unit = f"aqt-{os.getpid()}.service"
    path = Path(mounts[kind]) / "system.slice" / unit
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup at {path}: {exc.strerror}")
    try:
        yield unit, path
    finally:
        wait_until(lambda: not (path / "cgroup.procs").read_text().split(), "the unit's processes to exit")
        path.rmdir()


def test_a_namespace_that_holds_all_of_a_system_unit_is_named_after_it(
        system_unit_cgroup: tuple[str, Path], processes: Callable[..., subprocess.Popen[bytes]]) -> None:
    unit, cgroup = system_unit_cgroup
    first = processes("unshare", "-n", "sleep", PROCESS_LIFE)
    inode = wait_until(lambda: netns_inode(first.pid) if settled(first) else None, "a namespace")
    (cgroup / "cgroup.procs").write_text(f"{first.pid}\n")
    assert [ref.name for ref in aq_netns.list_namespaces(book=None) if ref.inode == inode] == [unit]
    assert [ns.inode for ns in sweep(unit, owners=False).namespaces] == [inode]
    # A process of the unit in another namespace: the unit no longer names one namespace.
    outside = processes("sleep", PROCESS_LIFE)
    (cgroup / "cgroup.procs").write_text(f"{outside.pid}\n")
    assert [ref.name for ref in aq_netns.list_namespaces(book=None) if ref.inode == inode] == [f"pid:{first.pid}"]
    first.kill()
    outside.kill()


# --- the policy as an unprivileged user checks it --------------------------------------------------------


def test_check_of_a_deeply_nested_policy_is_one_line_for_any_user(test_user: User, user_dir: Path) -> None:
    path = user_dir / "deep.toml"
    path.write_text("a = " + "[" * 2000 + "]" * 2000 + "\n")
    os.chmod(path, 0o644)
    done = subprocess.run(test_user.command(PYTHON, "-m", "aqtune", "check", "--config", str(path)),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"{path}:1: ") and "nested 2000 levels deep" in line, line

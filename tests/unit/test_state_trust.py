"""What aqtune reads back and acts on as root: atomic writes, trusted directories, the change
ledger's records, the live state's writer, namespace identity and names (on a fake /proc), and the
tuning rights and robustness of the policy.

Each test here failed on the code before issue 12's state and policy fixes. Most need no root;
the few that chown files say so.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from aqtune.act import files, persist, state
from aqtune.act.ledger import FORMAT_VERSION, Entry, Ledger, LedgerError
from aqtune.collect import netns
from aqtune.decide import policy as policies
from aqtune.decide.policy import Apply, Policy, PolicyError, load, owner_allowed, parse
from aqtune.trust import untrusted_dir

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown files to another uid")
NOBODY = 65534
SOMAXCONN = "net.core.somaxconn"


# --- atomic writes ---------------------------------------------------------------------------------------


def test_sysctl_d_file_is_written_through_a_random_temp_name_never_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    conf = tmp_path / "90-aqtune.conf"
    # The fixed name the old code wrote to, planted as a symlink by someone who can write the directory.
    (tmp_path / "90-aqtune.conf.aqtune-tmp").symlink_to(victim)
    persist.sync_host_file([Entry("host", 1, SOMAXCONN, 128, 512, None, 0.0)], str(conf))
    assert victim.read_text() == "precious\n"
    assert conf.read_text().splitlines()[1:] == [f"{SOMAXCONN} = 512"]
    assert stat.S_IMODE(conf.stat().st_mode) == 0o644 and not conf.is_symlink()


def test_atomic_write_replaces_a_symlink_at_the_target_and_leaves_no_temp_file(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    target = tmp_path / "state.json"
    target.symlink_to(victim)
    old_umask = os.umask(0o077)
    try:
        files.write_atomically(str(target), "{}", mode=0o640, durable=True)
    finally:
        os.umask(old_umask)
    assert victim.read_text() == "precious\n" and not target.is_symlink() and target.read_text() == "{}"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "victim"]


def test_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "changes.json"
    target.write_text("old")
    (tmp_path / "sub").mkdir()
    with pytest.raises(IsADirectoryError):
        files.write_atomically(str(tmp_path / "sub"), "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["changes.json", "sub"]


# --- trusted directories ---------------------------------------------------------------------------------


def test_group_or_world_writable_state_dir_is_not_trusted(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    for mode in (0o770, 0o757, 0o777):
        os.chmod(state_dir, mode)
        assert "writable by group or others" in (untrusted_dir(str(state_dir)) or "")
    os.chmod(state_dir, 0o750)
    assert untrusted_dir(str(state_dir)) is None


def test_a_parent_anyone_can_write_makes_the_state_dir_untrusted_unless_it_is_sticky(tmp_path: Path) -> None:
    parent = tmp_path / "shared"
    (parent / "state").mkdir(parents=True)
    os.chmod(parent, 0o777)
    assert f"{parent} is writable" in (untrusted_dir(str(parent / "state")) or "")
    os.chmod(parent, 0o1777)  # as /tmp: nobody else may rename the entries of others
    assert untrusted_dir(str(parent / "state")) is None
    # A state dir that does not exist yet is judged by the directory it will be created in.
    assert untrusted_dir(str(parent / "missing")) is not None
    # A sticky state dir is no better: anyone could create the ledger in it before aqtune does.
    os.chmod(parent / "state", 0o1777)
    assert untrusted_dir(str(parent / "state")) is not None


def test_a_symlinked_state_dir_is_judged_by_its_target(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    os.chmod(real, 0o777)
    (tmp_path / "link").symlink_to(real)
    assert f"{real} is writable" in (untrusted_dir(str(tmp_path / "link")) or "")


@needs_root
def test_state_dir_owned_by_another_user_is_not_trusted(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    os.chown(state_dir, NOBODY, -1)
    assert f"owned by uid {NOBODY}" in (untrusted_dir(str(state_dir)) or "")
    with pytest.raises(LedgerError, match=f"owned by uid {NOBODY}.*chown root:root"):
        Ledger(str(state_dir))


# --- the ledger's records --------------------------------------------------------------------------------


def valid_change(**overrides: Any) -> dict[str, Any]:
    change = {"netns": "web", "netns_inode": 4026532000, "sysctl": SOMAXCONN, "original": 128, "applied": 512,
              "pending": None, "changed_at": 1700000000.0, "earlier": [], "cookie": 4242}
    change.update(overrides)
    return change


def ledger_dir(tmp_path: Path, document: Any) -> str:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o750)
    data = document if isinstance(document, bytes) else (
        document if isinstance(document, str) else json.dumps(document)).encode()
    (state_dir / "changes.json").write_bytes(data)
    os.chmod(state_dir / "changes.json", 0o600)
    return str(state_dir)


def test_a_valid_ledger_of_either_version_is_read(tmp_path: Path) -> None:
    legacy = valid_change()
    del legacy["cookie"]
    second = valid_change(sysctl="net.ipv4.tcp_max_syn_backlog", original=0)
    state_dir = ledger_dir(tmp_path, {"version": 1, "changes": [legacy, second]})
    first, second = Ledger(state_dir).entries
    assert (first.cookie, first.original, second.cookie, second.original) == (None, 128, 4242, 0)


@pytest.mark.parametrize(("change", "says"), [
    (valid_change(sysctl="kernel.core_pattern"), "sysctl: must be one of"),
    (valid_change(sysctl="net/../../../etc/passwd"), "sysctl: must be one of"),
    (valid_change(applied="1\nkernel.core_pattern = |/tmp/x"), "applied: must be an integer"),
    (valid_change(original=2**31), "original: must be in [0, 2147483647]"),
    (valid_change(original=-1), "original: must be in"),
    (valid_change(applied=True), "applied: must be an integer"),
    (valid_change(pending=1.5), "pending: must be an integer"),
    (valid_change(earlier=[64, "x"]), "earlier: must be an integer"),
    (valid_change(earlier=list(range(1, 5000))), "earlier: must be a list of at most"),
    (valid_change(netns_inode="4026532000"), "netns_inode: must be an integer"),
    (valid_change(netns_inode=0), "netns_inode: must be in"),
    (valid_change(netns="web\x1b]0;owned\x07"), "netns: must be a namespace name"),
    (valid_change(netns="x" * 300), "netns: must be a namespace name"),
    (valid_change(netns=""), "netns: must be a namespace name"),
    (valid_change(changed_at=float("nan")), "changed_at: must be a time"),
    (valid_change(cookie=-4), "cookie: must be in"),
    (valid_change(path="/proc/sys/kernel/core_pattern"), "unknown field 'path'"),
    ({k: v for k, v in valid_change().items() if k != "original"}, "original: missing"),
    ("not an object", "must be an object"),
])
def test_a_malformed_record_refuses_the_whole_ledger_in_one_line(tmp_path: Path, change: Any, says: str) -> None:
    # A valid record first: nothing may be acted on when any record is wrong.
    state_dir = ledger_dir(tmp_path, {"version": FORMAT_VERSION, "changes": [valid_change(), change]})
    with pytest.raises(LedgerError) as caught:
        Ledger(state_dir)
    message = str(caught.value)
    assert "\n" not in message and f"changes.json: change 1: {says}" in message, message


@pytest.mark.parametrize(("text", "says"), [
    ("{", "malformed JSON"),
    ("[" * 100000 + "]" * 100000, "malformed JSON"),  # deeper than json's recursion
    ('{"version": 1, "changes": {}}', "expected"),
    ('["version", 1]', "expected"),
    ('{"version": 99, "changes": []}', "unknown ledger version 99"),
    ('{"version": true, "changes": []}', "unknown ledger version true"),
    (b'\xff{"version": 2}', "malformed JSON"),
])
def test_a_malformed_ledger_file_is_one_line(tmp_path: Path, text: str | bytes, says: str) -> None:
    state_dir = ledger_dir(tmp_path, text)
    with pytest.raises(LedgerError) as caught:
        Ledger(state_dir)
    assert "\n" not in str(caught.value) and says in str(caught.value), str(caught.value)


def test_a_ledger_file_others_can_write_is_refused(tmp_path: Path) -> None:
    state_dir = ledger_dir(tmp_path, {"version": FORMAT_VERSION, "changes": []})
    os.chmod(Path(state_dir) / "changes.json", 0o666)
    with pytest.raises(LedgerError, match="writable by group or others"):
        Ledger(state_dir)


def test_a_symlinked_ledger_is_refused(tmp_path: Path) -> None:
    state_dir = ledger_dir(tmp_path, {"version": FORMAT_VERSION, "changes": []})
    elsewhere = tmp_path / "elsewhere.json"
    os.rename(Path(state_dir) / "changes.json", elsewhere)
    (Path(state_dir) / "changes.json").symlink_to(elsewhere)
    with pytest.raises(LedgerError, match="is a symlink"):
        Ledger(state_dir)


def test_refresh_rereads_only_what_another_process_changed(tmp_path: Path) -> None:
    state_dir = str(tmp_path / "state")
    daemon, rollback = Ledger(state_dir), Ledger(state_dir)
    assert daemon.refresh() is False
    rollback.begin("web", 4026532000, SOMAXCONN, 128, 512, 1.0, cookie=7)
    rollback.commit(4026532000, SOMAXCONN)
    assert daemon.refresh() is True and [e.applied for e in daemon.entries] == [512]
    assert daemon.refresh() is False
    # The daemon's own writes are not news to it.
    daemon.begin("web", 4026532000, SOMAXCONN, 512, 1024, 2.0, cookie=7)
    assert daemon.refresh() is False
    assert rollback.refresh() is True and rollback.entries[0].pending == 1024
    rollback.forget(rollback.entries[0])
    assert daemon.refresh() is True and daemon.entries == []


def test_begin_replaces_a_dead_namespaces_record_for_a_reused_inode(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path / "state"))
    ledger.begin("pid:10", 4026532000, SOMAXCONN, 128, 512, 1.0, cookie=7)
    ledger.commit(4026532000, SOMAXCONN)
    # A new namespace (cookie 8) got the inode: its record starts afresh from its own value.
    ledger.begin("pid:20", 4026532000, SOMAXCONN, 4096, 16384, 2.0, cookie=8)
    (entry,) = ledger.entries
    assert (entry.netns, entry.cookie, entry.original, entry.applied, entry.pending) == ("pid:20", 8, 4096, 4096, 16384)


def test_stale_records_are_those_whose_inode_another_namespace_has(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path / "state"))
    ledger.entries = [Entry("web", 10, SOMAXCONN, 1, 2, None, 0.0, cookie=100),
                      Entry("pid:5", 11, SOMAXCONN, 1, 2, None, 0.0, cookie=101),
                      Entry("pid:6", 12, SOMAXCONN, 1, 2, None, 0.0),  # before cookies: unprovable
                      Entry("host", 13, SOMAXCONN, 1, 2, None, 0.0),  # the host's never dies
                      Entry("gone", 14, SOMAXCONN, 1, 2, None, 0.0, cookie=102),
                      Entry("unread", 15, SOMAXCONN, 1, 2, None, 0.0, cookie=104)]
    live = [netns.NamespaceRef("web", 10, "/x", 100), netns.NamespaceRef("pid:7", 11, "/x", 999),
            netns.NamespaceRef("pid:6", 12, "/x", 103), netns.NamespaceRef("host", 13, "/x", 1),
            netns.NamespaceRef("unread", 15, "/x", None)]  # its cookie could not be read this time
    assert [e.netns for e in ledger.stale(live)] == ["pid:5", "pid:6"]
    assert [e.netns for e in ledger.drop_stale(live, save=False)] == ["pid:5", "pid:6"]
    assert [e.netns for e in ledger.entries] == ["web", "host", "gone", "unread"]
    assert not (tmp_path / "state").exists(), "save=False writes nothing"


# --- the live state --------------------------------------------------------------------------------------


@pytest.fixture
def aqtune_run_lookalike() -> Any:
    """A process whose command line reads like `aqtune run` (its pid and start time are real)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "/usr/bin/aqtune", "run"],
                               stdin=subprocess.DEVNULL)
    yield process
    process.kill()
    process.wait(timeout=5)


def state_document(pid: int, **daemon: Any) -> dict[str, Any]:
    return {"taken_at": time.time(), "listeners": [], "namespaces": [],
            "daemon": {"pid": pid, "interval": 1.0, "publish_every": 5.0, **daemon}}


def write_raw_state(state_dir: Path, document: dict[str, Any]) -> None:
    state_dir.mkdir(mode=0o750, exist_ok=True)
    (state_dir / state.STATE_FILE).write_text(json.dumps(document))
    os.chmod(state_dir / state.STATE_FILE, 0o644)


def test_the_live_state_of_a_running_aqtune_run_is_believed(tmp_path: Path, aqtune_run_lookalike: Any) -> None:
    pid = aqtune_run_lookalike.pid
    identity = {"pid_start": state._start_time(pid), "boot_id": state._boot_id()}
    write_raw_state(tmp_path / "state", state_document(pid, **identity))
    document, why = state.live_state(str(tmp_path / "state"))
    assert why is None and document is not None and document["daemon"]["pid"] == pid


def test_write_state_records_its_writer(tmp_path: Path) -> None:
    state.write_state(str(tmp_path / "state"), state_document(os.getpid()))
    daemon = json.loads((tmp_path / "state" / state.STATE_FILE).read_text())["daemon"]
    assert daemon["pid"] == os.getpid() and daemon["pid_start"] == state._start_time(os.getpid())
    assert daemon["boot_id"] == state._boot_id()


@pytest.mark.parametrize(("forge", "says"), [
    (lambda pid, start: state_document(1), "does not name the process"),
    (lambda pid, start: state_document(1, pid_start=state._start_time(1) or 0), "pid 1 is not an `aqtune run`"),
    (lambda pid, start: {**state_document(pid, pid_start=start), "taken_at": time.time() + 3600},
     "in the future"),
    (lambda pid, start: {**state_document(pid, pid_start=start), "taken_at": "soon"}, "no valid taken_at"),
    (lambda pid, start: {"taken_at": time.time()}, "no daemon section"),
])
def test_a_forged_live_state_is_not_shown_as_the_daemon(tmp_path: Path, forge: Any, says: str) -> None:
    if "pid 1" in says and state._start_time(1) is None:
        pytest.skip("PID 1's /proc/1/stat is not readable here")
    pid = os.getpid()  # alive, but pytest, not `aqtune run`
    write_raw_state(tmp_path / "state", forge(pid, state._start_time(pid)))
    document, why = state.live_state(str(tmp_path / "state"))
    assert document is None and why is not None and says in why, why
    assert state.read_live_state(str(tmp_path / "state")) is None


def test_a_state_from_a_process_that_reused_the_pid_is_not_live(tmp_path: Path) -> None:
    pid = os.getpid()
    write_raw_state(tmp_path / "state", state_document(pid, pid_start=(state._start_time(pid) or 0) + 1))
    assert state.live_state(str(tmp_path / "state")) == (None, None)


def test_malformed_state_files_are_ignored_with_a_reason(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o750)
    for text in ("{", "[" * 100000, "null", '{"daemon": []}'):
        (state_dir / state.STATE_FILE).write_text(text)
        document, why = state.live_state(str(state_dir))
        assert document is None and why, text[:10]


def test_a_state_in_a_directory_others_can_write_is_ignored(tmp_path: Path, aqtune_run_lookalike: Any) -> None:
    pid = aqtune_run_lookalike.pid
    write_raw_state(tmp_path / "state", state_document(pid, pid_start=state._start_time(pid)))
    os.chmod(tmp_path / "state", 0o777)
    document, why = state.live_state(str(tmp_path / "state"))
    assert document is None and why is not None and "writable by group or others" in why



def test_a_daemon_may_be_live_only_while_its_state_is_written_at_the_default_cadence(tmp_path: Path) -> None:
    """One stat decides whether `aqtune status` starts its owners' walk: a stopped daemon's state left
    behind must not make every later status walk /proc after the dump instead of alongside it."""
    state_dir = tmp_path / "state"
    assert not state.may_be_live(str(state_dir))  # no directory, no file
    write_raw_state(state_dir, state_document(os.getpid()))
    written = (state_dir / state.STATE_FILE).stat().st_mtime
    assert state.may_be_live(str(state_dir), now=written + 3 * state.PUBLISH_EVERY + state.STALE_AFTER)
    assert not state.may_be_live(str(state_dir), now=written + 3 * state.PUBLISH_EVERY + state.STALE_AFTER + 1)


# --- namespaces: names from a fake /proc -----------------------------------------------------------------


class FakeProc:
    """A /proc with chosen processes: ns/net links (readlink only), start times and cgroups. Its
    PID 1 is this process's real /proc entry, so the host namespace and its device are real."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        (root / "1").symlink_to(f"/proc/{os.getpid()}")
        (root / "self").mkdir()
        (root / "self" / "mountinfo").write_text("")

    def process(self, pid: int, inode: int, start: int, cgroup: str = "/") -> None:
        directory = self.root / str(pid)
        (directory / "ns").mkdir(parents=True)
        (directory / "ns" / "net").symlink_to(f"net:[{inode}]")
        (directory / "stat").write_text(f"{pid} (a b) c) S 1 {' '.join(['0'] * 17)} {start} 0 0\n")
        (directory / "cgroup").write_text(f"0::{cgroup}\n")

    def cgroup2(self, mount: Path) -> None:
        (self.root / "self" / "mountinfo").write_text(f"41 31 0:38 / {mount} rw - cgroup2 cgroup2 rw\n")


def fake_list(proc: FakeProc, book: netns.NameBook | None = None) -> dict[int, str]:
    refs = netns.list_namespaces(run_netns=str(proc.root / "no-run-netns"), proc=str(proc.root), book=book,
                                 identify=False)
    return {ref.inode: ref.name for ref in refs[1:]}


def test_a_namespace_is_named_after_its_longest_lived_process_not_its_lowest_pid(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.process(50, 9000001, start=900)  # a later helper that got a low pid after the pids wrapped
    proc.process(100, 9000001, start=500)
    assert fake_list(proc) == {9000001: "pid:100"}


def test_a_namespace_all_of_whose_unit_lives_in_it_is_named_after_the_unit(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    cgroups = tmp_path / "cgroup"
    proc.cgroup2(cgroups)
    for unit, pids in {"docker-0123abcd.scope": [60, 61], "web.service": [70], "leaky.service": [80, 81]}.items():
        (cgroups / "system.slice" / unit / "payload").mkdir(parents=True)
        (cgroups / "system.slice" / unit / "cgroup.procs").write_text(f"{pids[0]}\n")
        (cgroups / "system.slice" / unit / "payload" / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids[1:]))
    proc.process(60, 9000002, 10, "/system.slice/docker-0123abcd.scope")
    proc.process(61, 9000002, 11, "/system.slice/docker-0123abcd.scope/payload/system.slice/nginx.service")
    proc.process(70, 9000003, 12, "/system.slice/web.service")
    # leaky.service has a process in the host's namespace too: it does not name the other one.
    proc.process(80, 9000004, 13, "/system.slice/leaky.service")
    proc.process(81, netns._ns_inode_of_link(f"/proc/{os.getpid()}/ns/net") or 0, 14,
                 "/system.slice/leaky.service/payload")
    # Anything under user.slice is chosen by the user: never a name.
    proc.process(90, 9000005, 15, "/user.slice/user-1000.slice/user@1000.service/app.slice/web2.service")
    assert fake_list(proc) == {9000002: "docker-0123abcd.scope", 9000003: "web.service", 9000004: "pid:80",
                               9000005: "pid:90"}


def test_a_name_is_kept_while_its_namespace_lives_and_not_given_to_a_new_one() -> None:
    book = netns.NameBook()
    identity = netns._Identity(cookie=77, user_owned=False, owner_uid=None)
    book.remember(9000001, identity, "pid:100", witness=100)
    assert (book.name(9000001, 77), book.identity(9000001, [100, 101])) == ("pid:100", identity)
    assert book.name(9000001, 78) is None, "another cookie is another namespace"
    # Without its witness the inode may be another namespace's now: identified afresh.
    assert book.identity(9000001, [101, 102]) is None
    book.remember(9000002, netns._Identity(cookie=None, user_owned=False, owner_uid=None), "pid:200", witness=200)
    assert book.identity(9000002, [200]) is None, "without a cookie nothing is remembered"
    book.keep_only({9000003})
    assert book.known == {}


# --- policy: tuning rights -------------------------------------------------------------------------------


def rights(text: str = "", uid_max: int = 999) -> Policy:
    policy = parse(text, "p.toml")
    return replace(policy, apply=replace(policy.apply, system_uid_max=uid_max))


@pytest.mark.parametrize(("text", "uid", "units", "user_owned", "allowed"), [
    ("", 0, (), False, True),
    ("", 999, (), False, True),
    ("", 1000, (), False, False),  # a local user's listener
    ("", 1000, ("nginx.service",), False, True),  # a system unit running as a regular uid
    ("", None, (), False, False),
    ("", 0, (), True, False),  # root inside a rootless container
    ("[apply]\nuser_namespaces = true", 0, (), True, True),
    ('[apply]\nowners = [1000]', 1000, (), False, True),
    ('[apply]\nowners = [1000]', 33, ("nginx.service",), False, False),
    ('[apply]\nowners = ["nginx.service"]', 33, ("nginx.service",), False, True),
    ('[apply]\nowners = ["nginx.service"]', 33, ("apache2.service",), False, False),
    ('[apply]\nowners = ["*"]', 4242, (), False, True),
    ("[apply]\nowners = []", 0, ("nginx.service",), False, False),
])
def test_owner_allowed(text: str, uid: int | None, units: tuple[str, ...], user_owned: bool, allowed: bool) -> None:
    reason = owner_allowed(rights(text), uid, units, user_owned)
    assert (reason is None) == allowed, reason


def test_system_users_follow_login_defs(tmp_path: Path) -> None:
    defs = tmp_path / "login.defs"
    defs.write_text("# SYS_UID_MAX 999\nUID_MIN 1000\nSYS_UID_MAX\t\t499\n")
    assert policies.read_system_uid_max(str(defs)) == 499
    assert policies.read_system_uid_max(str(tmp_path / "absent")) == 999
    assert owner_allowed(rights(uid_max=499), 600, (), False) is not None


@pytest.mark.parametrize("value", ['["nginx"]', '[-1]', '[true]', '[1.5]', '"system-users"', '[["x"]]'])
def test_bad_owners_are_named(value: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse(f"[apply]\nowners = {value}\n", "p.toml")
    [problem] = caught.value.problems
    assert (problem.line, problem.key) == (2, "apply.owners")


def test_defaults_keep_users_and_user_namespaces_out() -> None:
    assert Apply().owners == ("system-users", "system-units") and Apply().user_namespaces is False


# --- policy: robustness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "a = " + "[" * 2000 + "]" * 2000,
    "a = " + "{b=" * 1400 + "1" + "}" * 1400,
    "[apply]\nnamespaces = " + "[" * 1500 + '"x"' + "]" * 1500,
    "apply.namespaces." + ".".join(["a"] * 2000) + " = 1",  # a bad value quoted in the problem
    "[" + ".".join(["a"] * 2000) + "]",
])
def test_a_deeply_nested_policy_is_a_problem_not_a_crash(text: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse(text, "deep.toml")
    assert len(caught.value.problems) == 1 and "not a policy file" in str(caught.value), str(caught.value)


def test_brackets_in_strings_and_comments_are_not_nesting() -> None:
    deep = "[" * 40
    text = (f'# {deep}\n[apply]\nnamespaces = ["{deep}\\"{deep}", \'{"{" * 40}\', """\n{deep}\n"""]\n')
    assert len(parse(text).apply.namespaces) == 3


def test_many_unknown_keys_are_located_and_capped() -> None:
    # 20,000 unknown keys took 24 s to locate (quadratic); each is now a dictionary lookup.
    text = "".join(f"key{i} = 1\n" for i in range(20000)) + "[apply]\n" + "".join(f"k{i} = 1\n" for i in range(100))
    with pytest.raises(PolicyError) as caught:
        parse(text, "many.toml")
    problems = caught.value.problems
    assert len(problems) == policies.MAX_PROBLEMS + 1 and problems[-1].message == "... and 20000 more problems"
    assert [(p.line, p.key) for p in problems[:2]] == [(1, "key0"), (2, "key1")]


def test_a_huge_value_is_quoted_short() -> None:
    with pytest.raises(PolicyError) as caught:
        parse(f'mode = "{"x" * 100000}"\n', "p.toml")
    assert len(str(caught.value)) < 300


def policy_file(path: Path, text: str, uid: int = 0, mode: int = 0o644) -> Path:
    path.write_text(text)
    os.chown(path, uid, -1)
    os.chmod(path, mode)
    return path


@needs_root
def test_apply_is_refused_when_a_parent_directory_is_not_roots_alone(tmp_path: Path) -> None:
    directory = tmp_path / "etc"
    directory.mkdir()
    path = policy_file(directory / "policy.toml", 'mode = "apply"\n')
    assert load(str(path)).applies
    os.chmod(directory, 0o777)
    refused = load(str(path))
    assert not refused.applies and f"{directory} is writable by group or others" in (refused.apply_refused or "")
    os.chmod(directory, 0o755)
    os.chown(directory, NOBODY, -1)
    refused = load(str(path))
    assert not refused.applies and f"{directory} is owned by uid {NOBODY}" in (refused.apply_refused or "")


@needs_root
def test_apply_from_roots_file_in_a_sticky_directory_is_kept(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    os.chmod(directory, 0o1777)  # as /tmp: nobody else can replace root's file in it
    assert load(str(policy_file(directory / "policy.toml", 'mode = "apply"\n'))).applies


@needs_root
def test_apply_is_judged_on_the_file_that_was_read_not_a_swapped_one(tmp_path: Path) -> None:
    # A symlink flipped between root's apply policy and another user's: the ownership checked must
    # be that of the file whose text was read, or someone else's policy runs in apply mode.
    roots = policy_file(tmp_path / "roots.toml", 'mode = "apply"\ninterval = 1.0\n')
    theirs = policy_file(tmp_path / "theirs.toml", 'mode = "apply"\ninterval = 2.0\n', uid=NOBODY)
    link = tmp_path / "policy.toml"
    link.symlink_to(roots)
    stop = threading.Event()

    def flip() -> None:
        spare = tmp_path / "spare"
        targets = [theirs, roots]
        while not stop.is_set():
            for target in targets:
                spare.unlink(missing_ok=True)
                spare.symlink_to(target)
                os.replace(spare, link)

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        seen = [load(str(link)) for _ in range(1000)]
    finally:
        stop.set()
        flipper.join()
    assert not [p for p in seen if p.applies and p.interval == 2.0], "another user's policy ran in apply mode"
    assert {p.interval for p in seen} == {1.0, 2.0}, "the flip never raced the load; nothing was shown"


def test_a_refused_ledger_names_the_fix(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o777)
    os.chmod(state_dir, 0o777)
    with pytest.raises(LedgerError) as caught:
        Ledger(str(state_dir))
    assert f"chmod 750 {state_dir}" in str(caught.value) and "\n" not in str(caught.value)


def test_check_says_what_apply_mode_may_touch(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('mode = "apply"\n[apply]\nnamespaces = ["web"]\nowners = [33, "nginx.service"]\n')
    done = subprocess.run([sys.executable, "-m", "aqtune", "check", "--config", str(path)], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parents[2], stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert line.endswith("; applies in namespaces web for owners 33, nginx.service)"), line

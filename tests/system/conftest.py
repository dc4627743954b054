"""Fixtures of the system tier: the real .deb, a rootfs per Debian release and a booted systemd container.

Everything is session-scoped and built once: the package (scripts/build-deb.sh, lintian included),
and per release (Debian 12 bookworm and 13 trixie; AQTUNE_SYSTEM_SUITES chooses) the rootfs
(mmdebstrap, cached under /var/cache/aqtune-ci keyed by release and package list) and one container
that the tests in test_package.py walk through install, use, upgrade and purge in order. The tests
on the container are parametrized by release; pytest runs one release's tests, then the other's,
with one container up at a time. Finalizers stop the container and remove its cgroups and scratch
directories whatever happened.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.system.machine import (
    BASE_PACKAGES,
    RELEASES,
    Container,
    Release,
    cached_rootfs,
    clean_env,
    deb_dependencies,
)

if TYPE_CHECKING:
    from _pytest.terminal import TerminalReporter  # pytest 7.2 (Debian 12) does not export it

REPO = Path(__file__).resolve().parents[2]
REQUIRED_TOOLS = {"systemd-nspawn": "systemd-container", "mmdebstrap": "mmdebstrap", "nsenter": "util-linux",
                  "unshare": "util-linux"}
# AQTUNE_ROOTFS_CACHE="" builds the rootfs in a temporary directory and removes it afterwards.
ROOTFS_CACHE = os.environ.get("AQTUNE_ROOTFS_CACHE", "/var/cache/aqtune-ci")
UPGRADE_VERSION_SUFFIX = "+systest1"
UPGRADE_POLICY_LINE = "# (changed by the upgrade under test)\n"
# The package as it was laid out before the unit moved to /usr/lib/systemd/system, versioned below
# the one under test: upgrading from it must keep the unit, its enablement and an edited policy.
OLD_LAYOUT_VERSION_SUFFIX = "~liblayout"
UNIT_PATH = "usr/lib/systemd/system/aqtune.service"
OLD_UNIT_PATH = "lib/systemd/system/aqtune.service"
# Which releases' containers the package is tested in (space-separated suites).
SUITES = os.environ.get("AQTUNE_SYSTEM_SUITES", " ".join(RELEASES)).split()

# Seconds per phase, printed at the end of the run.
TIMINGS: dict[str, float] = {}
NOTES: dict[str, str] = {}


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "system tests need root: they boot a systemd-nspawn container"
    missing = [f"{tool} (Debian package {package})" for tool, package in REQUIRED_TOOLS.items()
               if shutil.which(tool, path=clean_env()["PATH"]) is None]
    if missing:
        return f"system tests need {', '.join(missing)}: not found"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("system") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_terminal_summary(terminalreporter: TerminalReporter) -> None:
    if TIMINGS or NOTES:
        terminalreporter.section("system tier")
        for phase, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{phase}: {seconds:.1f} s")
        for key, text in NOTES.items():
            terminalreporter.write_line(f"{key}: {text}")


@dataclass(frozen=True)
class Package:
    deb: Path  # the package as scripts/build-deb.sh built it
    changes: Path  # its upload (.changes with the source package), for each release's lintian
    upgrade: Path  # the same package with a higher version and a changed shipped policy
    old_layout: Path  # the same package, a lower version, its unit in /lib/systemd/system
    version: str
    lintian: list[str]  # the host's lintian's lines as build-deb.sh printed them
    root: Path  # the .deb unpacked, for host-side checks


@pytest.fixture(scope="session")
def system_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("system")


@pytest.fixture(scope="session")
def package(system_dir: Path) -> Package:
    debs = system_dir / "debs"
    started = time.monotonic()
    build = subprocess.run(["bash", str(REPO / "scripts" / "build-deb.sh"), str(debs), "--with-source"],
                           capture_output=True, text=True, env=clean_env(TMPDIR=str(system_dir)), timeout=900)
    TIMINGS["build .deb + lintian"] = time.monotonic() - started
    if build.returncode != 0:
        pytest.fail(f"scripts/build-deb.sh failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}")
    deb = next(debs.glob("aqtune_*_all.deb"))
    changes = next(debs.glob("aqtune_*.changes"))
    version = deb.name.split("_")[1]
    lintian = [line.removeprefix("lintian: ") for line in build.stdout.splitlines() if line.startswith("lintian: ")]
    root = system_dir / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, env=clean_env())
    return Package(deb, changes, _upgrade_package(deb, version, system_dir / "repack"),
                   _old_layout_package(deb, version, system_dir / "repack-old"), version, lintian, root)


def _repack(deb: Path, work: Path, version: str, change: Callable[[Path], None]) -> Path:
    """The .deb unpacked into ``work``, changed by ``change(work)``, given ``version`` and packed
    again next to it, with its md5sums made anew."""
    env = clean_env()
    subprocess.run(["dpkg-deb", "-R", str(deb), str(work)], check=True, env=env)
    control = work / "DEBIAN" / "control"
    control.write_text(re.sub(r"^Version: .*$", f"Version: {version}", control.read_text(), flags=re.M))
    change(work)
    # As dh_md5sums makes it: every regular file but the control area and the conffiles.
    conffiles = set((work / "DEBIAN" / "conffiles").read_text().split())
    files = sorted(name for path in work.rglob("*")
                   if path.is_file() and not path.is_symlink() and path.parts[len(work.parts)] != "DEBIAN"
                   and "/" + (name := str(path.relative_to(work))) not in conffiles)
    md5 = subprocess.run(["md5sum", "--", *files], cwd=work, capture_output=True, text=True, check=True, env=env).stdout
    (work / "DEBIAN" / "md5sums").write_text(md5)
    repacked = deb.with_name(f"aqtune_{version}_all.deb")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(work), str(repacked)], check=True,
                   capture_output=True, env=env)
    shutil.rmtree(work)
    return repacked


def _upgrade_package(deb: Path, version: str, work: Path) -> Path:
    """The .deb repacked as a newer version whose shipped policy differs, as a real upgrade's would:
    dpkg then has a conffile changed on both sides and must keep the admin's."""
    def change(tree: Path) -> None:
        with (tree / "etc" / "aqtune" / "policy.toml").open("a") as f:
            f.write(UPGRADE_POLICY_LINE)
    return _repack(deb, work, version + UPGRADE_VERSION_SUFFIX, change)


def _old_layout_package(deb: Path, version: str, work: Path) -> Path:
    """The .deb as the package shipped it before this layout: the same files, the unit in
    /lib/systemd/system (where Debian 12's debhelper puts it), a lower version. Maintainer scripts
    name the unit, not its path, so they are the old package's too."""
    def change(tree: Path) -> None:
        (tree / OLD_UNIT_PATH).parent.mkdir(parents=True)
        (tree / UNIT_PATH).rename(tree / OLD_UNIT_PATH)
        (tree / UNIT_PATH).parent.rmdir()
    return _repack(deb, work, version + OLD_LAYOUT_VERSION_SUFFIX, change)


@pytest.fixture(scope="session", params=SUITES)
def release(request: pytest.FixtureRequest) -> Release:
    suite: str = request.param
    if suite not in RELEASES:
        pytest.fail(f"AQTUNE_SYSTEM_SUITES names {suite!r}; known: {', '.join(RELEASES)}")
    return RELEASES[suite]


@pytest.fixture(scope="session")
def rootfs(package: Package, release: Release, system_dir: Path) -> Iterator[Path]:
    packages = sorted({*BASE_PACKAGES, *deb_dependencies(package.deb)})
    started = time.monotonic()
    cache = Path(ROOTFS_CACHE) if ROOTFS_CACHE else None
    log = system_dir / f"mmdebstrap-{release.suite}.log"
    try:
        with cached_rootfs(cache, release, packages, log) as path:
            TIMINGS[f"{release.suite}: rootfs (mmdebstrap, or the cache)"] = time.monotonic() - started
            NOTES[f"{release.suite}: rootfs"] = f"{path} with {', '.join(packages)}"
            yield path
    except subprocess.CalledProcessError:
        pytest.fail(f"mmdebstrap failed:\n{log.read_text(errors='replace')[-4000:]}")


def _nspawn_args(debs: Path) -> list[str]:
    """--private-network: apt in there can only install the local .deb, and the flood stays inside.
    eBPF as on a host: the capabilities and syscalls nspawn withholds by default. The kernel headers
    bcc compiles against are the rootfs's own (see machine.build_rootfs)."""
    return ["--private-network", "--capability=CAP_BPF,CAP_PERFMON", "--system-call-filter=bpf perf_event_open",
            f"--bind-ro={debs}:/mnt/debs"]


@pytest.fixture(scope="session")
def machine(package: Package, release: Release, rootfs: Path, system_dir: Path) -> Iterator[Container]:
    container = Container(f"aqtune-ci-{release.suite}-{os.getpid()}", rootfs, _nspawn_args(package.deb.parent),
                          system_dir / f"console-{release.suite}.log")
    started = time.monotonic()
    try:
        state = container.boot()
        TIMINGS[f"{release.suite}: container boot"] = time.monotonic() - started
        NOTES[f"{release.suite}: container state after boot"] = state
        NOTES[f"{release.suite}: systemd"] = container.run("systemctl", "--version").stdout.split("\n")[0]
        # systemd mounts tracefs on a host (sys-kernel-tracing.mount) but not in a container; bcc
        # attaches tracepoints through it. Mounted from outside, as the host's systemd would.
        tracefs = container.run("mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing", check=False)
        if tracefs.returncode != 0:
            NOTES[f"{release.suite}: tracefs"] = f"not mounted in the container: {tracefs.stderr.strip()}"
        yield container
    finally:
        tests_started = started + TIMINGS.get(f"{release.suite}: container boot", 0)
        TIMINGS[f"{release.suite}: container tests"] = time.monotonic() - tests_started
        container.stop()
        leftovers = container.leftovers()
        assert not leftovers, f"container cleanup left {leftovers}"

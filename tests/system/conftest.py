"""Fixtures of the system tier: the real .deb, a bookworm rootfs and a booted systemd container.

Everything is session-scoped and built once: the package (scripts/build-deb.sh, lintian included),
the rootfs (mmdebstrap, cached under /var/cache/aqtune-ci keyed by the package list), and one
container that the tests in test_package.py walk through install, use, upgrade and purge in order.
Finalizers stop the container and remove its cgroups and scratch directories whatever happened.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.system.machine import BASE_PACKAGES, Container, cached_rootfs, clean_env, deb_dependencies

if TYPE_CHECKING:
    from _pytest.terminal import TerminalReporter  # pytest 7.2 (Debian 12) does not export it

REPO = Path(__file__).resolve().parents[2]
REQUIRED_TOOLS = {"systemd-nspawn": "systemd-container", "mmdebstrap": "mmdebstrap", "nsenter": "util-linux",
                  "unshare": "util-linux"}
# AQTUNE_ROOTFS_CACHE="" builds the rootfs in a temporary directory and removes it afterwards.
ROOTFS_CACHE = os.environ.get("AQTUNE_ROOTFS_CACHE", "/var/cache/aqtune-ci")
UPGRADE_VERSION_SUFFIX = "+systest1"
UPGRADE_POLICY_LINE = "# (changed by the upgrade under test)\n"

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
    upgrade: Path  # the same package with a higher version and a changed shipped policy
    version: str
    lintian: list[str]  # lintian's lines as build-deb.sh printed them
    root: Path  # the .deb unpacked, for host-side checks


@pytest.fixture(scope="session")
def system_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("system")


@pytest.fixture(scope="session")
def package(system_dir: Path) -> Package:
    debs = system_dir / "debs"
    started = time.monotonic()
    build = subprocess.run(["bash", str(REPO / "scripts" / "build-deb.sh"), str(debs)], capture_output=True, text=True,
                           env=clean_env(TMPDIR=str(system_dir)), timeout=900)
    TIMINGS["build .deb + lintian"] = time.monotonic() - started
    if build.returncode != 0:
        pytest.fail(f"scripts/build-deb.sh failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}")
    deb = next(debs.glob("aqtune_*_all.deb"))
    version = deb.name.split("_")[1]
    lintian = [line.removeprefix("lintian: ") for line in build.stdout.splitlines() if line.startswith("lintian: ")]
    root = system_dir / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, env=clean_env())
    return Package(deb, _upgrade_package(deb, version, system_dir / "repack"), version, lintian, root)


def _upgrade_package(deb: Path, version: str, work: Path) -> Path:
    """The .deb repacked as a newer version whose shipped policy differs, as a real upgrade's would:
    dpkg then has a conffile changed on both sides and must keep the admin's."""
    new_version = version + UPGRADE_VERSION_SUFFIX
    env = clean_env()
    subprocess.run(["dpkg-deb", "-R", str(deb), str(work)], check=True, env=env)
    control = work / "DEBIAN" / "control"
    control.write_text(re.sub(r"^Version: .*$", f"Version: {new_version}", control.read_text(), flags=re.M))
    policy = work / "etc" / "aqtune" / "policy.toml"
    with policy.open("a") as f:
        f.write(UPGRADE_POLICY_LINE)
    md5 = subprocess.run(["md5sum", "etc/aqtune/policy.toml"], cwd=work, capture_output=True, text=True, check=True,
                         env=env).stdout
    md5sums = work / "DEBIAN" / "md5sums"
    lines = [line for line in md5sums.read_text().splitlines(keepends=True)
             if not line.rstrip().endswith(" etc/aqtune/policy.toml")]
    md5sums.write_text("".join(lines) + md5)
    upgrade = deb.with_name(f"aqtune_{new_version}_all.deb")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(work), str(upgrade)], check=True,
                   capture_output=True, env=env)
    shutil.rmtree(work)
    return upgrade


@pytest.fixture(scope="session")
def rootfs(package: Package, system_dir: Path) -> Iterator[Path]:
    packages = sorted({*BASE_PACKAGES, *deb_dependencies(package.deb)})
    started = time.monotonic()
    cache = Path(ROOTFS_CACHE) if ROOTFS_CACHE else None
    log = system_dir / "mmdebstrap.log"
    try:
        with cached_rootfs(cache, packages, log) as path:
            TIMINGS["rootfs (mmdebstrap, or the cache)"] = time.monotonic() - started
            NOTES["rootfs"] = f"{path} with {', '.join(packages)}"
            yield path
    except subprocess.CalledProcessError:
        pytest.fail(f"mmdebstrap failed:\n{log.read_text(errors='replace')[-4000:]}")


def _nspawn_args(debs: Path) -> list[str]:
    """--private-network: apt in there can only install the local .deb, and the flood stays inside.
    eBPF as on a host: the capabilities and syscalls nspawn withholds by default, and the running
    kernel's headers (read-only) for bcc, when the host has them."""
    args = ["--private-network", "--capability=CAP_BPF,CAP_PERFMON", "--system-call-filter=bpf perf_event_open",
            f"--bind-ro={debs}:/mnt/debs"]
    modules = Path("/lib/modules", os.uname().release)
    if modules.is_dir():
        args.append(f"--bind-ro={modules}")
    if Path("/usr/src").is_dir():
        args.append("--bind-ro=/usr/src")
    return args


@pytest.fixture(scope="session")
def machine(package: Package, rootfs: Path, system_dir: Path) -> Iterator[Container]:
    container = Container(f"aqtune-ci-{os.getpid()}", rootfs, _nspawn_args(package.deb.parent),
                          system_dir / "console.log")
    started = time.monotonic()
    try:
        state = container.boot()
        TIMINGS["container boot"] = time.monotonic() - started
        NOTES["container state after boot"] = state
        # systemd mounts tracefs on a host (sys-kernel-tracing.mount) but not in a container; bcc
        # attaches tracepoints through it. Mounted from outside, as the host's systemd would.
        tracefs = container.run("mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing", check=False)
        if tracefs.returncode != 0:
            NOTES["tracefs"] = f"not mounted in the container: {tracefs.stderr.strip()}"
        yield container
    finally:
        tests_started = started + TIMINGS.get("container boot", 0)
        TIMINGS["container tests"] = time.monotonic() - tests_started
        container.stop()
        leftovers = container.leftovers()
        assert not leftovers, f"container cleanup left {leftovers}"

"""A real systemd machine for the package tests: a cached Debian rootfs (bookworm or trixie) booted
with systemd-nspawn.

The host's PID 1 is not systemd, which shapes everything here (see the packaging research notes):
nspawn runs with ``--register=no --keep-unit`` (there is no machined or system bus to register
with), in its own cgroup (so two containers never share ``payload/``/``supervisor/``), in a private
mount namespace with a tmpfs on /run/systemd (nspawn cannot clean its propagation directory off an
on-disk /run). ``--volatile=overlay`` keeps the cached rootfs pristine: every write goes to a tmpfs
that vanishes with the container. Commands go in through nsenter with a clean environment, or the
host's pyenv PATH and locale would leak in.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import glob
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
REPO = Path(__file__).resolve().parents[2]
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"


@dataclass(frozen=True)
class Release:
    """A Debian release the package is tested on."""

    suite: str
    version: str

    @property
    def sources(self) -> tuple[str, ...]:
        """The release with its updates and security fixes, as a current machine of it runs."""
        return (f"deb {MIRROR} {self.suite} main", f"deb {MIRROR} {self.suite}-updates main",
                f"deb {SECURITY_MIRROR} {self.suite}-security main")


# Debian 12 (oldstable) and Debian 13 (stable since 2025-08): systemd 252 and 257, Python 3.11 and
# 3.13, bcc 0.26 and 0.31, lintian 2.116 and 2.122.
RELEASES = {release.suite: release for release in (Release("bookworm", "12"), Release("trixie", "13"))}
# What a Debian server has besides the package's own dependencies: systemd as PID 1, D-Bus for
# systemctl and systemd-analyze. apt and dpkg come with minbase. lintian is the release's own, for
# checking the package the way that release's archive would.
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "lintian")
# Kernel headers the release's bcc compiles, installed in the rootfs by the project's own script
# (see _headers_hooks): the host's headers may be a release the container's bcc cannot compile
# (Debian 12's bcc 0.26 fails on 6.12's).
HEADERS_SCRIPT = REPO / "scripts" / "kernel-headers.sh"
STALE_ROOTFS_SECONDS = 86400
CGROUP_HIERARCHIES = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified", "/sys/fs/cgroup")
CGROUP_PARENT = "aqtune-ci"
PR_SET_PDEATHSIG = 1


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM (a clean poweroff, for nspawn) if the test runner dies
    without running its finalizers. Survives the execs, none of which is setuid."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def clean_env(**extra: str) -> dict[str, str]:
    return {"PATH": CLEAN_PATH, "LANG": "C.UTF-8", "HOME": "/root", **extra}


def deb_dependencies(deb: Path) -> list[str]:
    """The packages a .deb's Depends names, first alternative each, without versions or :any."""
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True,
                             check=True, env=clean_env()).stdout
    names = []
    for clause in depends.split(","):
        first = clause.split("|")[0].strip()
        if first:
            names.append(first.split()[0].split(":")[0])
    return sorted(set(names))


def rootfs_key(release: Release, packages: Sequence[str]) -> str:
    """What a cached rootfs holds: the release, its sources, the packages and the kernel headers
    (made for the running kernel by the script, so its text and the kernel release count too)."""
    text = "\n".join([release.suite, *release.sources, *sorted(packages), os.uname().release,
                      hashlib.sha256(HEADERS_SCRIPT.read_bytes()).hexdigest()])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _headers_hooks() -> list[str]:
    """mmdebstrap hooks that run scripts/kernel-headers.sh in the new tree, as `make deps` would on
    a machine of that release: /lib/modules/$(uname -r)/build then leads to headers the release's
    bcc compiles (this kernel's own package where the release has it, else the release's cloud
    kernel's headers, never an image)."""
    script = "/tmp/aqtune-kernel-headers.sh"
    return [f'--customize-hook=cp {HEADERS_SCRIPT} "$1{script}"',
            f'--customize-hook=chroot "$1" bash {script}',
            f'--customize-hook=rm -f "$1{script}"']


def build_rootfs(target: Path, release: Release, packages: Sequence[str], log: Path) -> None:
    """mmdebstrap a minbase rootfs with ``packages`` and kernel headers; removes a half-built tree
    on failure."""
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with open(log, "w") as out:
            subprocess.run(["mmdebstrap", "--variant=minbase", f"--include={','.join(packages)}", *_headers_hooks(),
                            release.suite, str(partial), *release.sources], stdout=out, stderr=subprocess.STDOUT,
                           check=True, env=clean_env(), timeout=900)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


@contextlib.contextmanager
def cached_rootfs(cache_dir: Path | None, release: Release, packages: Sequence[str], log: Path) -> Iterator[Path]:
    """The rootfs of ``release`` with ``packages``: from ``cache_dir`` (keyed by release, package
    list and headers, built once; the release's other keys pruned once unused for a day, since a
    session of another checkout may be using one), or, without a cache, built in a temporary
    directory removed afterwards."""
    if cache_dir is None:
        scratch = Path(tempfile.mkdtemp(prefix="aqtune-rootfs-", dir="/var/tmp"))
        try:
            build_rootfs(scratch / "rootfs", release, packages, log)
            yield scratch / "rootfs"
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{release.suite}-{rootfs_key(release, packages)}"
    # One builder at a time; a second session waits and then finds the tree ready.
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            build_rootfs(target, release, packages, log)
        os.utime(target)  # last used now
        for stale in cache_dir.glob(f"{release.suite}-*"):
            if stale != target and time.time() - stale.stat().st_mtime > STALE_ROOTFS_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
    yield target


class Container:
    """One booted container; ``stop()`` is safe to call in any state, any number of times."""

    def __init__(self, name: str, rootfs: Path, extra_args: Sequence[str], log: Path) -> None:
        self.name = name
        self.rootfs = rootfs
        self.extra_args = list(extra_args)
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        self._volatile_before: set[str] = set()

    # --- life cycle ---

    def boot(self, timeout: float = 90.0) -> str:
        """Start the container and wait for its boot to finish; returns the system state."""
        self._volatile_before = set(glob.glob("/tmp/nspawn-volatile-*"))
        self._remove_stale_cgroups()
        # The wrapper moves itself into the container's own cgroups, then execs nspawn, so the
        # Popen pid is nspawn's. On a hybrid host the tmpfs /sys/fs/cgroup has no cgroup.procs.
        wrapper = r"""
            set -e
            name=$1; shift
            for h in "$@"; do
                [ "$h" = -- ] && break
                [ -e "$h/cgroup.procs" ] || continue
                mkdir -p "$h/$name" && echo $$ > "$h/$name/cgroup.procs"
            done
            while [ "$1" != -- ]; do shift; done; shift
            mkdir -p /run/systemd
            mount -t tmpfs -o mode=0755 tmpfs /run/systemd
            exec "$@"
        """
        hierarchies = [f"{h}/{CGROUP_PARENT}" for h in self._hierarchies()]
        nspawn = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", f"--machine={self.name}",
                  f"--directory={self.rootfs}", "--boot", "--console=pipe", "--volatile=overlay",
                  "--link-journal=no", *self.extra_args]
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", wrapper, "sh", self.name,
                 *hierarchies, "--", *nspawn],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=clean_env(),
                # Its own session: a Ctrl-C meant for pytest must not reach nspawn before stop() does.
                start_new_session=True, preexec_fn=_terminate_with_parent)
        deadline = time.monotonic() + timeout
        while self.leader is None:
            if self.process.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.process.returncode}: {self.console()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no container init after {timeout:.0f} s: {self.console()}")
            self.leader = self._init_pid()
            time.sleep(0.05)
        # is-system-running --wait fails until the manager's private socket exists.
        while True:
            state = self.run("systemctl", "is-system-running", "--wait", check=False,
                             timeout=max(deadline - time.monotonic(), 1)).stdout.strip()
            if state in ("running", "degraded"):
                return state
            if time.monotonic() > deadline:
                raise RuntimeError(f"container did not finish booting: state {state!r}; {self.console()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> None:
        """Power the container off (SIGTERM to nspawn), kill what is left, remove its cgroups and
        nspawn's scratch directories."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        for pid in self._cgroup_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for hierarchy in self._hierarchies():
            top = Path(hierarchy, CGROUP_PARENT, self.name)
            for _ in range(50):
                if not top.exists():
                    break
                for directory in sorted(top.glob("**/"), key=lambda p: len(p.parts), reverse=True):
                    with contextlib.suppress(OSError):
                        directory.rmdir()
                time.sleep(0.1)
            with contextlib.suppress(OSError):
                Path(hierarchy, CGROUP_PARENT).rmdir()  # only when no other container uses it
        for scratch in set(glob.glob("/tmp/nspawn-volatile-*")) - self._volatile_before:
            with contextlib.suppress(OSError):
                os.rmdir(scratch)  # empty once nspawn's mount namespace is gone
        self.leader = None

    def leftovers(self) -> list[str]:
        """What stop() should have removed and did not."""
        found = [str(Path(h, CGROUP_PARENT, self.name)) for h in self._hierarchies()
                 if Path(h, CGROUP_PARENT, self.name).exists()]
        found += sorted(set(glob.glob("/tmp/nspawn-volatile-*")) - self._volatile_before)
        if self.process is not None and self.process.poll() is None:
            found.append(f"systemd-nspawn pid {self.process.pid}")
        return found

    # --- inside ---

    def run(self, *command: str, check: bool = True, timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in the container (all its namespaces), with a clean environment."""
        assert self.leader is not None, "container is not running"
        env = ["PATH=" + CLEAN_PATH, "LANG=C.UTF-8", "HOME=/root", "TERM=dumb", "DEBIAN_FRONTEND=noninteractive",
               "SYSTEMD_PAGER=cat", "PAGER=cat", "SYSTEMD_COLORS=0"]
        # --root and --wd: the container's root is its PID 1's, which need not be its mount
        # namespace's root (seen with Debian 13's systemd-nspawn 257 started from a chroot: entering
        # the namespace alone lands on the host's root).
        enter = ["nsenter", "-t", str(self.leader), "-a", "--root", "--wd"]
        result = subprocess.run([*enter, "env", "-i", *env, *command],
                                capture_output=True, text=True, timeout=timeout, input=input,
                                stdin=None if input is not None else subprocess.DEVNULL, env=clean_env())
        if check and result.returncode != 0:
            raise AssertionError(f"in container: {' '.join(command)} exited {result.returncode}\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    def write(self, path: str, text: str) -> None:
        self.run("sh", "-c", 'cat > "$1"', "sh", path, input=text)

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout

    def console(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    # --- internals ---

    @staticmethod
    def _hierarchies() -> list[str]:
        """The cgroup trees nspawn places the container in: name=systemd v1 and cgroup2 on a
        hybrid host, the cgroup2 root on a unified one."""
        found: list[str] = []
        for hierarchy in CGROUP_HIERARCHIES:
            if hierarchy == "/sys/fs/cgroup" and found:
                continue
            if os.path.exists(f"{hierarchy}/cgroup.procs"):
                found.append(hierarchy)
        return found

    def _remove_stale_cgroups(self) -> None:
        """Empty cgroups of containers whose runner was killed before it could clean up; rmdir
        fails on any still in use."""
        for hierarchy in self._hierarchies():
            parent = Path(hierarchy, CGROUP_PARENT)
            if not parent.is_dir():
                continue
            for directory in sorted(parent.glob("*/**/"), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    directory.rmdir()

    def _init_pid(self) -> int | None:
        """The container's PID 1: nspawn's child named systemd."""
        assert self.process is not None
        parent = self.process.pid
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{parent}/task"):
                for child in Path(f"/proc/{parent}/task/{task}/children").read_text().split():
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return int(child)
        return None

    def _cgroup_pids(self) -> set[int]:
        pids = set()
        for hierarchy in self._hierarchies():
            for procs in Path(hierarchy, CGROUP_PARENT, self.name).glob("**/cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids |= {int(pid) for pid in procs.read_text().split()}
        pids.discard(os.getpid())
        return pids

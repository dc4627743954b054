"""What the tests marked ``kernel`` need from the running kernel, and how a missing piece is reported.

They need kprobes and fentry (BPF trampolines), which some kernels lack: this project's own dev
and CI VMs have no CONFIG_KPROBES and refuse fentry. There a test marked ``kernel`` skips with the
precise reason, and the qemu tier (tests/qemu/run-kernel-tier.sh) runs it on Debian's stock
kernels instead (6.1 with Debian 12's userland, 6.12 with Debian 13's). Inside that tier
(AQTUNE_KERNEL_TIER=1, set by the guest's init) the same reason fails the test: the tier exists to
run these tests, so it must never pass by skipping them.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

import pytest

KERNEL_TIER_ENV = "AQTUNE_KERNEL_TIER"
QEMU_TIER = "runs in the qemu tier: bash tests/qemu/run-kernel-tier.sh"
TRACEFS_DIRS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe/type")  # perf's kprobe PMU: bcc attaches through it
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
# The symbol bcc's BPF.support_kfunc() looks for; absent, the kernel has no BPF trampolines.
TRAMPOLINE_SYMBOL = "bpf_trampoline_link_prog"
KPROBE_SYMBOL = "register_kprobe"


def in_kernel_tier() -> bool:
    return os.environ.get(KERNEL_TIER_ENV) == "1"


def unavailable(reason: str) -> NoReturn:
    """Skip for ``reason`` outside the qemu tier; fail inside it."""
    if in_kernel_tier():
        pytest.fail(f"the kernel tier's guest lacks what a kernel test needs: {reason}", pytrace=False)
    pytest.skip(f"{reason} — {QEMU_TIER}")


def kprobe_events_file() -> Path | None:
    """tracefs's kprobe_events, where tracefs is mounted (mounting it is not the tests' business)."""
    for directory in TRACEFS_DIRS:
        if (directory / "kprobe_events").exists():
            return directory / "kprobe_events"
    return None


@functools.cache
def kernel_config() -> dict[str, str] | None:
    """The running kernel's build configuration (/proc/config.gz or /boot/config-RELEASE), if readable."""
    text = None
    try:
        text = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        try:
            text = Path(f"/boot/config-{os.uname().release}").read_text()
        except OSError:
            return None
    options = {}
    for line in text.splitlines():
        if match := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            options[match[1]] = match[2]
        elif match := re.fullmatch(r"# (CONFIG_\w+) is not set", line):
            options[match[1]] = "n"
    return options


@functools.cache
def kernel_symbols(*names: str) -> frozenset[str] | None:
    """Which of ``names`` /proc/kallsyms lists (names are listed even where addresses are hidden)."""
    try:
        text = Path("/proc/kallsyms").read_text()
    except OSError:
        return None
    pattern = re.compile(r" (" + "|".join(map(re.escape, names)) + r")$", re.M)
    return frozenset(pattern.findall(text))


def _kprobes_missing() -> str | None:
    if KPROBE_PMU.exists() or kprobe_events_file() is not None:
        return None
    config = kernel_config()
    setting = None if config is None else config.get("CONFIG_KPROBES", "n")
    if setting == "n":
        return "kprobes absent: CONFIG_KPROBES unset (no kprobe_events, no kprobe PMU)"
    if setting is None:
        symbols = kernel_symbols(KPROBE_SYMBOL, TRAMPOLINE_SYMBOL)
        if symbols is not None and KPROBE_SYMBOL not in symbols:
            return f"kprobes absent: no {KPROBE_SYMBOL} in /proc/kallsyms (no kprobe_events, no kprobe PMU)"
    return (f"kprobes unusable: CONFIG_KPROBES={setting or '?'} but neither the kprobe PMU ({KPROBE_PMU.parent}) "
            "nor kprobe_events in a mounted tracefs exists (CONFIG_KPROBE_EVENTS unset?)")


def _fentry_missing() -> str | None:
    if not VMLINUX_BTF.exists():
        return f"fentry unavailable: no kernel BTF at {VMLINUX_BTF} (CONFIG_DEBUG_INFO_BTF unset)"
    symbols = kernel_symbols(KPROBE_SYMBOL, TRAMPOLINE_SYMBOL)
    if symbols is not None and TRAMPOLINE_SYMBOL not in symbols:
        return f"fentry unavailable: no BPF trampolines ({TRAMPOLINE_SYMBOL} not in /proc/kallsyms)"
    return None


def _userland_missing() -> str | None:
    if os.geteuid() != 0:
        return "kernel tests need root: they load BPF programs and create network namespaces"
    try:
        import bcc  # noqa: F401  (python3-bpfcc: only Debian's python sees it)
    except ImportError as exc:
        return f"bcc is not importable by {sys.executable} ({exc}): install python3-bpfcc, run /usr/bin/python3"
    build = Path(f"/lib/modules/{os.uname().release}/build")
    if not build.exists():
        return f"bcc needs the running kernel's headers: no {build} (linux-headers-{os.uname().release})"
    return None


@functools.cache
def missing() -> str | None:
    """Why the kernel tests cannot run here, or None; the kernel's own gaps are named first."""
    return _kprobes_missing() or _fentry_missing() or _userland_missing()


def is_refusal(error: str) -> bool:
    """Whether a failed BPF load or attach was the kernel saying no (EPERM, EACCES), not a bug."""
    # bcc words EPERM on load as "Need super-user privileges to run", even for root.
    return any(words in error for words in ("Operation not permitted", "Permission denied", "super-user"))

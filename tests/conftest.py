"""Shared fixtures: the host-sysctl guard for every test, and throwaway namespaces for integration tests."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.helpers.namespace import TestNamespace

# CI must give the same verdict on the same code: property tests draw a fixed sequence there.
# Locally they stay random, and AQTUNE_EXAMPLES deepens the decision properties.
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# The host values no test may change; tests write sysctls only inside their own namespaces.
HOST_SYSCTLS = (
    "net/core/somaxconn",
    "net/ipv4/tcp_max_syn_backlog",
    "net/ipv4/tcp_syncookies",
    "net/ipv4/tcp_abort_on_overflow",
)
REQUIRED_TOOLS = ("ip", "ss", "nstat", "sysctl")
OWN_NETNS = "/proc/thread-self/ns/net"

_names = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: needs root and network namespaces (ip netns) on a real kernel")


def _integration_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root: they create network namespaces"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"integration tests need iproute2 and procps: {', '.join(missing)} not found on PATH"
    if not Path("/proc/self/ns/net").exists():
        return "integration tests need network namespaces (no /proc/self/ns/net)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _integration_skip_reason()
    if reason is None:
        return
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def _host_sysctls() -> dict[str, str]:
    values = {}
    for name in HOST_SYSCTLS:
        with open(f"/proc/sys/{name}") as f:
            values[name] = f.read().strip()
    return values


@pytest.fixture(scope="session", autouse=True)
def host_sysctls_unchanged() -> Iterator[dict[str, str]]:
    """Fails the session if any test changed a host sysctl, or left the test process in another netns.

    /proc/sys/net answers for the reading thread's namespace, so the values are only the host's
    while the test process is still where it started; aqtune's setns must always come back.
    """
    own_netns = os.readlink(OWN_NETNS)
    before = _host_sysctls()
    yield before
    assert os.readlink(OWN_NETNS) == own_netns, "the test process was left in another network namespace"
    assert _host_sysctls() == before, "a test changed a host sysctl"


@pytest.fixture
def netns() -> Iterator[Callable[[], TestNamespace]]:
    """Factory of fresh namespaces ``aqt-<pid>-<n>``; each is emptied and deleted after the test,
    whatever its outcome."""
    created: list[TestNamespace] = []

    def make() -> TestNamespace:
        namespace = TestNamespace(f"aqt-{os.getpid()}-{next(_names)}")
        created.append(namespace)
        return namespace

    yield make
    failures = []
    for namespace in reversed(created):
        try:
            namespace.destroy()
        except Exception as exc:  # one failed teardown must not leave the others behind
            failures.append(f"{namespace.name}: {exc}")
    leftover = [namespace.name for namespace in created if os.path.lexists(f"/run/netns/{namespace.name}")]
    assert not failures and not leftover, f"namespace teardown failed: {failures} left over: {leftover}"

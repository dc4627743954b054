"""Tests marked ``kernel`` in this directory skip with the precise reason where the kernel lacks
kprobes or fentry, and fail for it inside the qemu tier (see capabilities.py)."""

from __future__ import annotations

import pytest

from tests.kernel import capabilities


def pytest_runtest_setup(item: pytest.Item) -> None:
    # pluggy calls a conftest's hook before the built-in runner's, which sets up the fixtures:
    # a skipped test compiles no BPF.
    if item.get_closest_marker("kernel") is None:
        return
    reason = capabilities.missing()
    if reason is not None:
        capabilities.unavailable(reason)

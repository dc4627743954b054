"""Talking to a benchmark's helper processes: each is this repository's script re-run inside a
network namespace, answering in lines on stdout and stopping when its stdin closes."""

from __future__ import annotations

import select
import subprocess
from contextlib import suppress


def read_line(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], timeout)
    if not readable:
        raise TimeoutError(f"helper said nothing within {timeout:.0f} s")
    return process.stdout.readline().strip()


def stop(process: subprocess.Popen[str]) -> None:
    """Close its stdin (the helper's cue to exit), then wait for it; kill it if it does not go."""
    if process.stdin is not None and not process.stdin.closed:
        with suppress(BrokenPipeError):  # the helper already exited
            process.stdin.close()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)

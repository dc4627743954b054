"""The daemon's live state file, which `aqtune status` shows while the daemon runs."""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

STATE_FILE = "status.json"


def write_atomically(path: str, text: str, mode: int = 0o644) -> None:
    """Readers see the old file or the new one, never half of one."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_state(state_dir: str, document: dict[str, Any]) -> None:
    os.makedirs(state_dir, mode=0o750, exist_ok=True)
    write_atomically(os.path.join(state_dir, STATE_FILE), json.dumps(document, separators=(",", ":")))


def read_live_state(state_dir: str, now: float | None = None) -> dict[str, Any] | None:
    """The running daemon's state, or None when there is no daemon or its state is stale."""
    try:
        with open(os.path.join(state_dir, STATE_FILE), encoding="utf-8") as f:
            document: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        return None
    daemon = document.get("daemon", {})
    try:
        os.kill(int(daemon["pid"]), 0)
    except (KeyError, ValueError, TypeError, ProcessLookupError, PermissionError):
        return None
    # Three missed sweeps means the loop is stuck or gone: a fresh sweep is then more honest.
    max_age = 3 * max(float(daemon.get("interval", 1.0)), float(daemon.get("publish_every", 0.0))) + 2.0
    if (now or time.time()) - float(document.get("taken_at", 0)) > max_age:
        return None
    return document

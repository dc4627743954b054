"""The daemon's live state file, which `aqtune status` shows while the daemon runs.

`status` shows the file as the running daemon's only when it can be sure of that: the state
directory and file are root's alone, the file names its writer by pid, process start time and boot,
that process is still an `aqtune run`, and the state is recent (and not from the future).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from aqtune.act import files
from aqtune.trust import untrusted_dir

STATE_FILE = "status.json"
MAX_STATE_SIZE = 256 << 20  # the state is capped well below this; a larger file is not aqtune's
FUTURE_SLACK = 5.0  # seconds a state may seem ahead of this clock (clock steps) before it is refused
# The daemon rewrites its state at least this often while it runs (at once when what it shows
# changes; an interval above it stretches it to the interval); readers allow three rewrites.
PUBLISH_EVERY = 10.0
STALE_AFTER = 2.0  # seconds of slack on top of the three rewrites
BOOT_ID = "/proc/sys/kernel/random/boot_id"

# Compatible name for callers that imported it from here.
write_atomically = files.write_atomically


def _start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22); None if it is not running."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = text.rpartition(b")")[2].split()
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def _boot_id() -> str | None:
    try:
        with open(BOOT_ID, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def writer_identity() -> dict[str, Any]:
    """What names this process beyond its pid (pids are reused): its start time and the boot."""
    pid = os.getpid()
    return {"pid": pid, "pid_start": _start_time(pid), "boot_id": _boot_id()}


def write_state(state_dir: str, document: dict[str, Any], listeners: list[str] | None = None) -> None:
    """Publish ``document``; its ``daemon`` section gets this process's identity (writer_identity).

    ``listeners``, if given, are the listener entries already encoded as JSON (the daemon caches them:
    a quiet listener's entry is the same from one publish to the next); ``document`` then has none."""
    os.makedirs(state_dir, mode=0o750, exist_ok=True)
    if isinstance(document.get("daemon"), dict):
        document = {**document, "daemon": {**document["daemon"], **writer_identity()}}
    text = json.dumps(document, separators=(",", ":"), check_circular=False)  # a tree built fresh each sweep
    if listeners is not None:
        text = '{"listeners":[' + ",".join(listeners) + "]," + text[1:]
    files.write_atomically(os.path.join(state_dir, STATE_FILE), text)


def _is_aqtune_run(pid: int) -> bool:
    """Whether ``pid`` runs `aqtune run` (installed as /usr/bin/aqtune, or `python3 -m aqtune`)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read(1 << 16).split(b"\0")
    except OSError:
        return False
    named = [i for i, arg in enumerate(args) if os.path.basename(arg) == b"aqtune"]
    return bool(named) and b"run" in args[named[0] + 1:]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def may_be_live(state_dir: str, now: float | None = None) -> bool:
    """Whether a daemon may be writing state in ``state_dir``: its file was written recently enough
    for a daemon at the default cadence. One stat, for deciding what to start before the state is
    read; live_state decides. A daemon whose interval is above PUBLISH_EVERY can be taken for gone,
    which costs the caller work it then throws away, never a wrong answer."""
    try:
        written = os.stat(os.path.join(state_dir, STATE_FILE)).st_mtime
    except OSError:
        return False
    return (time.time() if now is None else now) - written <= 3 * PUBLISH_EVERY + STALE_AFTER


def live_state(state_dir: str, now: float | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """(the running daemon's state, None), or (None, why a state file there is not believed), or
    (None, None) when there is no daemon (no file, a stopped daemon, a stale state)."""
    path = os.path.join(state_dir, STATE_FILE)
    if not os.path.lexists(path):
        return None, None
    ignored = f"ignoring the daemon state {path}"
    reason = untrusted_dir(state_dir)
    if reason:
        return None, f"{ignored}: {reason} (only a state directory only root can write is believed)"
    try:
        data = files.read_trusted(path, MAX_STATE_SIZE)
    except ValueError as exc:
        return None, f"{ignored}: {exc}"
    except OSError as exc:
        return None, f"{ignored}: cannot read it ({exc.strerror})"
    if data is None:
        return None, None
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return None, f"{ignored}: not valid JSON"
    daemon = document.get("daemon") if isinstance(document, dict) else None
    if not isinstance(daemon, dict):
        return None, f"{ignored}: it has no daemon section"
    pid, started = daemon.get("pid"), daemon.get("pid_start")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0 or isinstance(started, bool) \
            or not isinstance(started, int):
        return None, f"{ignored}: it does not name the process that wrote it (pid and start time)"
    taken_at = _number(document.get("taken_at"))
    if taken_at is None:
        return None, f"{ignored}: it has no valid taken_at time"
    now = time.time() if now is None else now
    if taken_at > now + FUTURE_SLACK:
        return None, f"{ignored}: taken_at is {taken_at - now:.0f} s in the future"
    interval = _number(daemon.get("interval")) or 1.0
    publish_every = _number(daemon.get("publish_every")) or 0.0
    # Three missed sweeps means the loop is stuck or gone: a fresh sweep is then more honest.
    max_age = 3 * min(max(interval, publish_every, 0.0), 3600.0) + STALE_AFTER
    if now - taken_at > max_age:
        return None, None
    # The pid's start time (and the freshness above, which a state from before a reboot fails) tell a
    # live daemon from a reused pid; boot_id is only recorded: a sandboxed daemon and a shell in the
    # same container can read different ones (nspawn substitutes its own for the shell's).
    if _start_time(pid) != started:
        return None, None  # that daemon is gone (its pid may be another process's now)
    if not _is_aqtune_run(pid):
        return None, f"{ignored}: pid {pid} is not an `aqtune run` process"
    return document, None


def read_live_state(state_dir: str, now: float | None = None) -> dict[str, Any] | None:
    """The running daemon's state, or None when there is no daemon, its state is stale, or it cannot
    be believed (``live_state`` says why)."""
    return live_state(state_dir, now)[0]

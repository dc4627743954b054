"""Files aqtune writes and reads as root: atomic replacement, and reading back only trusted files.

Every file aqtune writes (the change ledger, the live state, /etc/sysctl.d/90-aqtune.conf, the
metrics textfile) is replaced whole: a reader sees the old file or the new one, never half of one.
The new text goes to a temporary file that ``mkstemp`` creates with O_EXCL (and O_NOFOLLOW) under a
random name in the same directory, so a symlink or file planted under a predictable name is never
followed or truncated, and ``rename`` then replaces the target itself (a symlink at the target is
replaced, not followed).

What aqtune reads back and acts on (the ledger drives sysctl writes as root) must come from a
directory and a file only root can change (``aqtune.trust``).
"""

from __future__ import annotations

import errno
import os
from contextlib import suppress

from aqtune.trust import untrusted_file


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, data: str | bytes, mode: int = 0o644, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` in one step, with permissions ``mode``.

    ``durable``: fsync the file before the rename and the directory after it, so that after a crash
    the file holds either the old or the new content and the rename itself survives (the ledger
    needs this; a state file rewritten every sweep does not).
    """
    import tempfile  # here: `aqtune status` reads files and need not load it (2 ms, random and weakref)

    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            # Before any byte is written: mkstemp's 0600 is tighter, but the final mode must not
            # depend on the umask either.
            os.fchmod(f.fileno(), mode)
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(directory)


def remove_durably(path: str) -> None:
    """Remove ``path`` (if there) and make the removal survive a crash."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    _fsync_dir(os.path.dirname(path) or ".")


def read_trusted(path: str, max_size: int) -> bytes | None:
    """The bytes of ``path`` if only root can have written them; None when it does not exist.

    Raises ValueError saying why the file is not trusted or too large, OSError when unreadable.
    Opened without following a symlink, and checked on the opened descriptor, so nothing can swap
    the file between the check and the read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise ValueError(f"{path} is a symlink; aqtune writes a regular file there") from None
        raise
    with os.fdopen(fd, "rb") as f:
        reason = untrusted_file(os.fstat(fd), path)
        if reason:
            raise ValueError(reason)
        data = f.read(max_size + 1)
    if len(data) > max_size:
        raise ValueError(f"{path} is larger than {max_size // 1024} KiB")
    return data

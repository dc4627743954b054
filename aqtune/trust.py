"""Whether a file or directory can be changed by nobody but root (or the user running aqtune).

aqtune runs as root and acts on files it reads back: the change ledger drives sysctl writes, the
live state is shown as the running daemon's, the policy may switch on apply mode. Each must come
from a place no other user can write, or another user could steer root through it.
"""

from __future__ import annotations

import os
import stat


def trusted_owners() -> tuple[int, ...]:
    """Root trusts only root; an unprivileged run (tests, a user's own state dir) also trusts
    itself, as ssh does for ~/.ssh."""
    euid = os.geteuid()
    return (0,) if euid == 0 else (0, euid)


def untrusted_dir(path: str, owners: tuple[int, ...] | None = None, sticky_ok: bool = False) -> str | None:
    """Why ``path`` (a directory that need not exist yet) is not one only root can change, or None.

    The directory itself must be owned by root (or by the unprivileged user running aqtune) and not
    writable by group or others; so must every directory above it up to /, except that a
    world-writable directory with the sticky bit (/tmp) may be a parent: there nobody but the owner
    may rename or remove a root-owned entry. Symlinks are resolved and their targets checked too.
    A missing directory is judged by its nearest existing parent (aqtune creates it 0750); one that
    can never exist (a regular file on its path) holds nothing to trust.

    ``sticky_ok``: the directory itself may be a sticky one too. Right for the directory of a file
    whose own owner is checked (nobody can replace root's file there); wrong for a state directory,
    where anyone could create the files aqtune reads before aqtune does.
    """
    owners = owners if owners is not None else trusted_owners()
    target = os.path.realpath(os.path.abspath(path))
    # The given path's own parents matter too: a symlink in a directory anyone can write could be
    # swapped for another one after this check.
    chains = [os.path.abspath(path)]
    if target != chains[0]:
        chains.append(target)
    for chain in chains:
        current = chain
        leaf = True
        while True:
            try:
                st = os.lstat(current)
            except (FileNotFoundError, NotADirectoryError):
                if not leaf:
                    return f"{current} does not exist"
                st = None
            except OSError as exc:
                return f"cannot inspect {current}: {exc.strerror}"
            if st is not None and not stat.S_ISLNK(st.st_mode):
                if not stat.S_ISDIR(st.st_mode):
                    if leaf:
                        return None  # it can never be a directory: nothing is read there, writes fail
                    return f"{current} is not a directory"
                writable = stat.S_IMODE(st.st_mode) & (stat.S_IWGRP | stat.S_IWOTH)
                sticky_parent = (sticky_ok or not leaf) and st.st_mode & stat.S_ISVTX
                if st.st_uid not in owners:
                    return f"{current} is owned by uid {st.st_uid}, not root"
                if writable and not sticky_parent:
                    return f"{current} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
            parent = os.path.dirname(current)
            if parent == current:
                break
            # A missing leaf is judged by its parent: it is created there, owned by whoever writes.
            leaf = st is None and leaf
            current = parent
    return None


def untrusted_file(st: os.stat_result, path: str, owners: tuple[int, ...] | None = None) -> str | None:
    """Why an opened file (its fstat) is not one only root can change, or None."""
    if st.st_uid not in (owners if owners is not None else trusted_owners()):
        return f"{path} is owned by uid {st.st_uid}, not root"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if stat.S_IMODE(st.st_mode) & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None

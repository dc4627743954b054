"""Host sysctl changes made to survive a reboot, in a sysctl.d file that rollback rewrites."""

from __future__ import annotations

import os

from aqtune.act.ledger import Entry

SYSCTL_D_FILE = "/etc/sysctl.d/90-aqtune.conf"
HEADER = "# Written by aqtune for the values it raised on the host; `aqtune rollback` removes them.\n"


def sync_host_file(entries: list[Entry], path: str = SYSCTL_D_FILE) -> None:
    """Make ``path`` hold exactly the host values aqtune applied (and vanish when there are none).

    Only host entries belong there: other namespaces do not exist at boot.
    """
    lines = [f"{e.sysctl} = {e.applied}\n" for e in entries if e.netns == "host" and e.applied != e.original]
    if not lines:
        if os.path.exists(path):
            os.unlink(path)
        return
    tmp = f"{path}.aqtune-tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(HEADER + "".join(lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

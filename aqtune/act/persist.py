"""Host sysctl changes made to survive a reboot, in a sysctl.d file that rollback rewrites."""

from __future__ import annotations

from aqtune.act.files import remove_durably, write_atomically
from aqtune.act.ledger import Entry

SYSCTL_D_FILE = "/etc/sysctl.d/90-aqtune.conf"
HEADER = "# Written by aqtune for the values it raised on the host; `aqtune rollback` removes them.\n"


def sync_host_file(entries: list[Entry], path: str = SYSCTL_D_FILE) -> None:
    """Make ``path`` hold exactly the host values aqtune applied (and vanish when there are none).

    Only host entries belong there: other namespaces do not exist at boot. The entries were
    checked when the ledger was read (known sysctl names, integers), so each line is one
    ``name = integer``. The file is replaced atomically through a temporary file with a random
    name, never a fixed one a planted symlink could redirect.
    """
    lines = [f"{e.sysctl} = {int(e.applied)}\n" for e in entries if e.netns == "host" and e.applied != e.original]
    if not lines:
        remove_durably(path)
        return
    write_atomically(path, HEADER + "".join(lines), mode=0o644, durable=True)

"""One observation sweep: every listener, its owners and its namespace's figures, as records."""

from __future__ import annotations

import errno
import socket
import time

from aqtune.collect import netlink, netns, procfs, sockdiag
from aqtune.records import Listener, Namespace, Snapshot


def read_namespace(ref: netns.NamespaceRef) -> tuple[Namespace, list[Listener]]:
    """Listeners, sysctls and TcpExt counters of one namespace, read from inside it."""
    rows: list[Listener] = []
    namespace = Namespace(ref.name, ref.inode, path=ref.path, cookie=ref.cookie, user_owned=ref.user_owned,
                          owner_uid=ref.owner_uid)
    with netns.entered(ref):
        namespace.sysctls = procfs.read_sysctls()
        namespace.counters = procfs.read_counters()
        ifnames = dict(socket.if_nameindex())
        with netlink.open_diag_socket() as sock:
            skipped = netlink.dump(sock, sockdiag.inet_listen_request(socket.AF_INET), sockdiag.decode_inet,
                                   ref.name, rows, ifnames)
            skipped += netlink.dump(sock, sockdiag.inet_listen_request(socket.AF_INET6), sockdiag.decode_inet,
                                    ref.name, rows, ifnames)
            try:
                skipped += netlink.dump(sock, sockdiag.unix_listen_request(), sockdiag.decode_unix, ref.name, rows)
            except sockdiag.NetlinkError as exc:
                # unix_diag is a module; without it TCP is still worth reporting.
                if exc.errno != errno.ENOENT:
                    raise
                namespace.error = "unix_diag unavailable (modprobe unix_diag): Unix listeners not shown"
    namespace.listeners = len(rows)
    namespace.skipped_messages = skipped
    return namespace, rows


def sweep(select: str | netns.Selection = "all", owners: bool = True,
          owner_cache: procfs.OwnerCache | None = None) -> Snapshot:
    """Read every selected namespace; a namespace that vanishes mid-sweep is reported, not fatal.

    Raises LookupError for an unknown ``select`` and PermissionError when not privileged enough.
    """
    started = time.time()
    clock = time.perf_counter()
    refs = netns.select_namespaces(netns.list_namespaces(), select)
    namespaces: list[Namespace] = []
    listeners: list[Listener] = []
    for ref in refs:
        try:
            namespace, rows = read_namespace(ref)
        except netns.NamespaceGone as exc:
            namespaces.append(Namespace(ref.name, ref.inode, error=f"vanished during the sweep ({exc})",
                                        cookie=ref.cookie))
            continue
        except PermissionError:
            raise
        except (OSError, sockdiag.NetlinkError) as exc:
            namespaces.append(Namespace(ref.name, ref.inode, error=f"could not be read: {exc}", cookie=ref.cookie))
            continue
        namespaces.append(namespace)
        listeners.extend(rows)
    if owners:
        inodes = {listener.inode for listener in listeners}
        found = owner_cache.lookup(inodes, started) if owner_cache else procfs.find_owners(inodes)
        for listener in listeners:
            listener.processes = found.get(listener.inode, ())
    return Snapshot(started, time.perf_counter() - clock, namespaces, listeners)

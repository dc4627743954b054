"""Compile the eBPF layer in a short-lived child, keep only its descriptors (the daemon's way).

bcc compiles bpf/aqtune.c with clang and LLVM inside the process that asks, and those libraries stay
mapped for good: about 90 MiB of the daemon's resident memory, and tens of MiB of heap, for a compile
done once. So the daemon (EventLayer.start_in_child) runs a child, this module, that does exactly what
EventLayer.start() does in-process, then sends every descriptor that keeps the work alive over a Unix
socket (SCM_RIGHTS) and exits without bcc's cleanup: the attachments (tracepoint perf events, raw
tracepoint and fentry links, kprobe perf events), the programs, the maps (under their names in
aqtune.c: `aqtune connections` finds accept_times by name, bpfmap.py) and the perf buffer's per-CPU
events. With them go the probe states, the mode, and the layouts of the map values and of the perf
record from bcc's ctypes types. The parent reads it all with bpftables.FdTables and never imports bcc.

Any failure in the child comes back as the text EventLayer.start() would have raised as Unavailable;
a child that dies, hangs or says nothing is Unavailable too. The child dies with the parent
(PR_SET_PDEATHSIG), and on any failure the parent kills it and closes whatever it received.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aqtune.collect.bpftables import EVENTS, ORDERED_MACHINES, FdTables, Held, Layout, MapRef
from aqtune.collect.ebpf import READ_MAPS, EventLayer, How, ProbeState, Unavailable

ROOT = Path(__file__).resolve().parents[2]  # the directory holding the aqtune package
COMPILE_TIMEOUT = 600.0  # s: a compile takes 2-5 s natively, about a minute under qemu's TCG
ACK_TIMEOUT = 60.0  # s the child waits for the parent to say it has the descriptors
EXIT_TIMEOUT = 30.0  # s the parent waits for the child to exit once it has them
MAX_FDS = 253  # SCM_MAX_FD: descriptors one message can carry (the layer holds about 20 + 1 per CPU)
MESSAGE_BYTES = 1 << 16
ERROR_TAIL = 2000  # characters of a failed child's stderr kept in the message
PR_SET_PDEATHSIG = 1
# The child's program: the parent's interpreter, isolated from the environment (-I), importing the
# same aqtune as the parent.
BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); from aqtune.collect.ebpf_child import child_main; "
        "sys.exit(child_main(sys.argv[2:]))")


def supported() -> bool:
    """Whether this process can take the layer over from a child: its perf rings read safely from
    Python (bpftables.ORDERED_MACHINES), and an interpreter to run the child with."""
    return platform.machine() in ORDERED_MACHINES and bool(sys.executable)


@dataclass(frozen=True, slots=True)
class Handover:
    tables: FdTables
    probes: dict[str, ProbeState]
    mode: str
    syn_overflow_seen: bool
    offsets_from: str


# --- the child --------------------------------------------------------------------------------------------


def held_fds(bpf: Any) -> Iterator[tuple[str, str, int]]:
    """(kind, name, fd) of every descriptor bcc holds for a loaded program: attachments, programs, maps
    (by the names in the C source) and the perf buffer's per-CPU events."""
    from bcc.libbcc import lib

    def text(name: Any) -> str:
        return name.decode() if isinstance(name, bytes) else str(name)

    for kind, held in (("tracepoint", bpf.tracepoint_fds), ("raw_tracepoint", bpf.raw_tracepoint_fds),
                       ("kprobe", bpf.kprobe_fds), ("fentry", bpf.kfunc_entry_fds),
                       ("fexit", bpf.kfunc_exit_fds)):
        for name, fd in held.items():
            if isinstance(fd, dict):  # kprobes: event name -> {program name: perf event fd}
                for program, inner in fd.items():
                    yield kind, f"{text(name)} {text(program)}", int(inner)
            else:
                yield kind, text(name), int(fd)
    for name, function in bpf.funcs.items():
        yield "program", text(name), int(function.fd)
    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.bpf_table_name.restype, lib.bpf_table_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_size_t]
    lib.bpf_table_fd_id.restype, lib.bpf_table_fd_id.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t]
    for index in range(lib.bpf_num_tables(bpf.module)):
        yield "map", text(lib.bpf_table_name(bpf.module, index)), int(lib.bpf_table_fd_id(bpf.module, index))
    for (_table, cpu), reader in bpf.perf_buffers.items():
        yield "perf_buffer", f"{EVENTS} cpu {cpu}", int(lib.perf_reader_fd(reader))


def probe_json(state: ProbeState) -> dict[str, str | None]:
    return {"how": state.how.value if state.how else None, "note": state.note, "why_not": state.why_not}


def probe_from_json(data: Mapping[str, Any]) -> ProbeState:
    how = data.get("how")
    return ProbeState(How(how) if how else None, data.get("note"), data.get("why_not"))


def describe(layer: EventLayer, pages: int) -> tuple[dict[str, Any], list[int]]:
    """The message and descriptors that hand ``layer`` (compiled here, with bcc) over."""
    bpf = layer.bpf
    held = list(held_fds(bpf))
    if len(held) > MAX_FDS:
        raise Unavailable(f"the eBPF layer holds {len(held)} descriptors, more than one message carries "
                          f"({MAX_FDS})")
    message = {"held": [[kind, name] for kind, name, _ in held],
               "layouts": {name: layout.to_json() for name, layout in layer.tables.layouts.items()},
               "key_sizes": {name: ctypes.sizeof(bpf[name].Key) for name in READ_MAPS},
               "probes": {target: probe_json(state) for target, state in layer.probes.items()},
               "mode": layer.mode, "syn_overflow_seen": layer.syn_overflow_seen,
               "offsets_from": layer.offsets_from, "pages": pages}
    return message, [fd for _, _, fd in held]


def _die_with(parent: int) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above: nobody to hand over to
        os._exit(1)


def child_main(argv: list[str]) -> int:
    """The child: ``fd parent-pid emit netns-inode pages``. Compiles, attaches, sends, exits."""
    fd, parent, emit, netns_inode, pages = (int(arg) for arg in argv)
    _die_with(parent)
    channel = socket.socket(fileno=fd)

    def say(message: dict[str, Any], fds: list[int] | None = None) -> None:
        socket.send_fds(channel, [json.dumps(message).encode()], fds or [])

    try:
        layer = EventLayer.start(emit=emit, netns_inode=netns_inode, pages=pages or None)
        message, fds = describe(layer, pages)
    except Unavailable as exc:
        say({"unavailable": str(exc)})
        return 2
    except Exception as exc:
        say({"unavailable": f"compiling the eBPF layer in a child failed: {type(exc).__name__}: {exc}"})
        return 1
    say(message, fds)
    channel.settimeout(ACK_TIMEOUT)
    with contextlib.suppress(OSError):
        channel.recv(16)  # the parent has them (or died: the kernel then frees everything)
    # No bcc cleanup: it would detach the probes the parent now holds (bcc closes its copies of the
    # descriptors only, but it also removes what it created by name, such as legacy kprobe events).
    os._exit(0)


# --- the parent -------------------------------------------------------------------------------------------


def handover_from(message: Mapping[str, Any], fds: list[int]) -> Handover:
    """The layer described by the child's ``message`` over the descriptors ``fds`` (from then on closed
    by the Handover's tables). ValueError/KeyError/OSError when they do not fit: ``fds`` stay open."""
    from aqtune.collect.bpfmap import map_info

    names = message["held"]
    if len(names) != len(fds):
        raise ValueError(f"{len(fds)} descriptors arrived for {len(names)} names")
    held = [Held(str(kind), str(name), fd) for (kind, name), fd in zip(names, fds, strict=True)]
    layouts = {name: Layout.from_json(data) for name, data in message["layouts"].items()}
    by_name = {h.name: h.fd for h in held if h.kind == "map"}
    maps = {}
    for name in READ_MAPS:
        ref = MapRef(by_name[name], int(message["key_sizes"][name]), layouts[name].size)
        _map_id, kernel_name, (key_size, value_size, _entries) = map_info(ref.fd)
        # The kernel keeps 15 characters of a map's name.
        if kernel_name != name.encode()[:15] or (key_size, value_size) != (ref.key_size, ref.value_size):
            raise ValueError(f"map {name}: the kernel has {kernel_name!r} with {key_size}-byte keys and "
                             f"{value_size}-byte values, the child said {ref.key_size} and {ref.value_size}")
        maps[name] = ref
    probes = {str(target): probe_from_json(state) for target, state in message["probes"].items()}
    tables = FdTables(held, maps, layouts, int(message["pages"]))
    return Handover(tables, probes, str(message["mode"]), bool(message["syn_overflow_seen"]),
                    str(message["offsets_from"]))


def receive(channel: socket.socket) -> tuple[bytes, list[int], int]:
    """One message and the descriptors it carries, close-on-exec from the start (socket.recv_fds
    ignores its flags argument, so MSG_CMSG_CLOEXEC is asked for here): (data, fds, msg_flags)."""
    ints = array.array("i")
    data, ancillary, flags, _ = channel.recvmsg(MESSAGE_BYTES, socket.CMSG_LEN(MAX_FDS * ints.itemsize),
                                                socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints.frombytes(payload[:len(payload) - len(payload) % ints.itemsize])
    return data, list(ints), flags


def compile_in_child(emit: int, netns_inode: int, pages: int) -> Handover:
    """Run the child and take the layer over; Unavailable (the child's reason, or what went wrong
    with it) when there is none. Nothing stays behind on failure: the child is killed, what it sent
    is closed."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # CLOEXEC
    fds: list[int] = []
    handed: Handover | None = None
    with tempfile.TemporaryFile() as errors:
        try:
            child = subprocess.Popen(
                [sys.executable, "-I", "-c", BOOT, str(ROOT), str(theirs.fileno()), str(os.getpid()), str(emit),
                 str(netns_inode), str(pages)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
        except OSError as exc:
            ours.close()
            theirs.close()
            raise Unavailable(f"cannot start {sys.executable} to compile the eBPF program: {exc}") from None
        theirs.close()
        try:
            ours.settimeout(COMPILE_TIMEOUT)
            try:
                data, fds, flags = receive(ours)
            except TimeoutError:
                raise Unavailable(f"the child compiling the eBPF program did not finish within "
                                  f"{COMPILE_TIMEOUT:.0f} s (pid {child.pid}, killed)") from None
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                raise Unavailable("the eBPF compiling child's message or descriptors were truncated")
            if not data:
                try:
                    status: int | str = child.wait(timeout=EXIT_TIMEOUT)
                except subprocess.TimeoutExpired:
                    status = "none yet"
                errors.seek(0)
                said = errors.read().decode(errors="replace").strip()[-ERROR_TAIL:]
                raise Unavailable(f"the child compiling the eBPF program exited (status {status}) without "
                                  f"handing it over" + (f": {said}" if said else ""))
            try:
                message = json.loads(data)
            except ValueError as exc:
                raise Unavailable(f"the eBPF compiling child's message is not JSON: {exc}") from None
            if "unavailable" in message:
                raise Unavailable(str(message["unavailable"]))
            try:
                handed = handover_from(message, fds)
            except (ValueError, KeyError, TypeError, OSError) as exc:
                raise Unavailable(f"the eBPF compiling child's hand-over does not fit: {exc}") from None
            with contextlib.suppress(OSError):
                ours.send(b"ok")
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=EXIT_TIMEOUT)
            return handed
        except BaseException:
            if handed is not None:
                handed.tables.close()
            else:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            raise
        finally:
            ours.close()
            if child.poll() is None:
                child.kill()
                child.wait()

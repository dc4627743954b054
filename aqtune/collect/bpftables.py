"""How the event layer reaches its maps and its perf buffer: one small interface, two ways.

BccTables goes through bcc, for a layer compiled in this process (`aqtune trace`, the benchmarks).
FdTables goes through bare descriptors handed over by a short-lived compiling child
(aqtune.collect.ebpf_child): bpf(2) for the maps, mmap of the perf events for the buffer, and never
bcc, so the daemon keeps neither bcc nor LLVM mapped. Both give keys as ints and values as bytes,
decoded by a Layout taken from bcc's own ctypes types for the map (in the child for FdTables), so
a change to a struct in bpf/aqtune.c changes both ways alike and cannot silently desync them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import platform
import select
import struct
import sys
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

EVENTS = "events"  # the perf buffer (BPF_PERF_OUTPUT in bpf/aqtune.c): its layout is the record's
SCALAR = "value"  # the one field of a layout for plain integer values (peaks, accept_times)
# Integer struct codes by (size, signed); a char array decodes as bytes ("s").
INT_CODES = {(1, False): "B", (2, False): "H", (4, False): "I", (8, False): "Q",
             (1, True): "b", (2, True): "h", (4, True): "i", (8, True): "q"}

Record = Callable[[bytes], None]
Lost = Callable[[int], None]


# --- layouts: where each field of a value is ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    offset: int
    code: str  # struct code of one element, or "s" for a char array (decoded as bytes)
    count: int  # elements: 1 for a scalar


@dataclass(frozen=True)  # no slots: the decoding plan is cached on the instance (cached_property)
class Layout:
    """A C struct's (or a plain integer's) fields as bcc's ctypes type has them; decodes its bytes."""

    size: int
    fields: tuple[Field, ...]

    @property
    def _struct(self) -> struct.Struct:
        parts, at = ["="], 0
        for f in sorted(self.fields, key=lambda f: f.offset):
            if f.offset < at:
                raise ValueError(f"field {f.name} at {f.offset} overlaps the one before (ends at {at})")
            if f.offset > at:
                parts.append(f"{f.offset - at}x")
            parts.append(f"{f.count}s" if f.code == "s" else f"{f.count}{f.code}")
            at = f.offset + f.count * (1 if f.code == "s" else struct.calcsize(f"={f.code}"))
        if at > self.size:
            raise ValueError(f"fields end at {at}, past the value's {self.size} bytes")
        return struct.Struct("".join(parts))

    @cached_property
    def _plan(self) -> tuple[struct.Struct, tuple[tuple[str, int, int], ...]]:
        """The compiled struct, and (field, first value, values: 0 for one) in its order: worked out
        once, since the daemon decodes a value per listener per sweep (a thousand per sweep)."""
        steps, i = [], 0
        for f in sorted(self.fields, key=lambda f: f.offset):
            single = f.code == "s" or f.count == 1
            steps.append((f.name, i, 0 if single else f.count))
            i += 1 if single else f.count
        return self._struct, tuple(steps)

    def decode(self, raw: bytes) -> dict[str, Any]:
        """{field: int, tuple of ints for an array, bytes for a char array} from a value's bytes."""
        compiled, steps = self._plan
        values = compiled.unpack_from(raw)
        return {name: values[i:i + count] if count else values[i] for name, i, count in steps}

    def zero(self) -> dict[str, Any]:
        return self.decode(bytes(self.size))

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "fields": [[f.name, f.offset, f.code, f.count] for f in self.fields]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Layout:
        fields = tuple(Field(str(n), int(o), str(c), int(k)) for n, o, c, k in data["fields"])
        for f in fields:
            if (f.code != "s" and f.code not in INT_CODES.values()) or f.count < 1 or f.offset < 0:
                raise ValueError(f"bad field {f}")
        layout = cls(int(data["size"]), fields)
        _ = layout._plan  # checks the fields fit
        return layout


def _element_code(ctype: Any) -> str:
    if ctype is ctypes.c_char:
        return "s"
    if getattr(ctype, "_type_", None) not in tuple("bBhHiIlLqQ"):  # ctypes' own codes of its integers
        raise ValueError(f"{getattr(ctype, '__name__', ctype)} is not an integer type")
    size = ctypes.sizeof(ctype)
    signed = ctype(-1).value < 0
    code = INT_CODES.get((size, signed))
    if code is None:
        raise ValueError(f"{ctype.__name__}: no {size}-byte integer code")
    return code


def layout_of(ctype: Any) -> Layout:
    """The Layout of a bcc ctypes type: a Structure of integers and arrays of them, or one integer."""
    if not hasattr(ctype, "_fields_"):
        return Layout(ctypes.sizeof(ctype), (Field(SCALAR, 0, _element_code(ctype), 1),))
    fields = []
    for spec in ctype._fields_:
        if len(spec) != 2:
            raise ValueError(f"{ctype.__name__}.{spec[0]}: bit fields are not decoded")
        name, ftype = spec
        offset = getattr(ctype, name).offset
        if issubclass(ftype, ctypes.Array):
            element = ftype._type_
            if hasattr(element, "_fields_") or issubclass(element, ctypes.Array):
                raise ValueError(f"{ctype.__name__}.{name}: arrays of structs or arrays are not decoded")
            code = _element_code(element)
            fields.append(Field(name, offset, code, ftype._length_))
        elif hasattr(ftype, "_fields_"):
            raise ValueError(f"{ctype.__name__}.{name}: nested structs are not decoded")
        else:
            fields.append(Field(name, offset, _element_code(ftype), 1))
    return Layout(ctypes.sizeof(ctype), tuple(fields))


# --- the interface ------------------------------------------------------------------------------------


class Tables(Protocol):
    """The layer's maps by name (keys as ints, values as bytes) and its perf buffer's records."""

    @property
    def layouts(self) -> Mapping[str, Layout]:
        """Value layout by map name; EVENTS: the perf buffer's record."""

    def entries(self, name: str) -> list[tuple[int, bytes]]: ...

    def drain(self, name: str) -> list[tuple[int, bytes]]:
        """All entries, deleted as they are read: what arrives meanwhile counts for the next drain."""

    def lookup(self, name: str, key: int) -> bytes | None: ...

    def delete(self, name: str, key: int) -> None:
        """Remove ``key``; nothing when it is not there."""

    def delete_many(self, name: str, keys: Collection[int]) -> None:
        """Remove every one of ``keys`` that is there: thousands at once after a churn of listeners."""

    def poll(self, timeout_ms: int, record: Record, lost: Lost) -> None:
        """Hand each pending perf record to ``record`` (bytes of at least the EVENTS layout's size) and
        each count of records the kernel lost to ``lost``; wait up to ``timeout_ms`` for the first."""

    def close(self) -> None: ...


# --- through bcc ----------------------------------------------------------------------------------------


class BccTables:
    """The maps and perf buffer of a bcc BPF object compiled in this process."""

    def __init__(self, bpf: Any, names: tuple[str, ...]) -> None:
        self.bpf = bpf
        self.layouts: dict[str, Layout] = {name: layout_of(bpf[name].Leaf) for name in names}
        self._record: Record | None = None
        self._lost: Lost | None = None

    @staticmethod
    def _number(value: Any) -> int:
        return int(getattr(value, "value", value))  # ctypes objects from items(), ints from batch reads

    def _value(self, name: str, value: Any) -> bytes:
        if isinstance(value, int):  # a plain integer value from a batch read
            layout = self.layouts[name]
            return value.to_bytes(layout.size, sys.byteorder, signed=layout.fields[0].code.islower())
        return bytes(value)

    def entries(self, name: str) -> list[tuple[int, bytes]]:
        table = self.bpf[name]
        try:  # batch lookups (one syscall per batch, not two per entry) where the kernel has them (5.6+)
            found = list(table.items_lookup_batch())
        except Exception:  # bcc raises bare Exception where batch operations are missing
            found = list(table.items())
        return [(self._number(k), self._value(name, v)) for k, v in found]

    def drain(self, name: str) -> list[tuple[int, bytes]]:
        table = self.bpf[name]
        try:
            found = list(table.items_lookup_and_delete_batch())
        except Exception:  # no batch operations: read, then delete one by one
            found = list(table.items())
            for key, _ in found:
                with contextlib.suppress(KeyError):
                    del table[key]
        return [(self._number(k), self._value(name, v)) for k, v in found]

    def lookup(self, name: str, key: int) -> bytes | None:
        table = self.bpf[name]
        try:
            return bytes(table[table.Key(key)])
        except KeyError:
            return None

    def delete(self, name: str, key: int) -> None:
        table = self.bpf[name]
        with contextlib.suppress(KeyError):
            del table[table.Key(key)]

    def delete_many(self, name: str, keys: Collection[int]) -> None:
        for key in keys:  # in-process only for trace and tests: the daemon's maps are BareTables
            self.delete(name, key)

    def open_events(self, pages: int) -> None:
        self.layouts[EVENTS] = layout_of(event_type(self.bpf))
        self.bpf[EVENTS].open_perf_buffer(self._deliver, page_cnt=pages, lost_cb=self._count_lost)

    def _deliver(self, _cpu: int, data: Any, size: int) -> None:
        if self._record is not None:
            # Copied out at once: the perf buffer's memory is reused when the callback returns.
            self._record(ctypes.string_at(data, size))

    def _count_lost(self, count: int) -> None:
        if self._lost is not None:
            self._lost(count)

    def poll(self, timeout_ms: int, record: Record, lost: Lost) -> None:
        self._record, self._lost = record, lost
        self.bpf.perf_buffer_poll(timeout=timeout_ms)

    def close(self) -> None:
        self.bpf.cleanup()


def event_type(bpf: Any) -> Any:
    """bcc's ctypes type for the perf buffer's records (struct event), by its public event() cast."""
    return type(bpf[EVENTS].event(ctypes.create_string_buffer(4096)))


# --- through descriptors: bpf(2) and the perf ring ------------------------------------------------------

SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_LOOKUP_AND_DELETE_BATCH = 25
BPF_MAP_DELETE_BATCH = 27
BATCH_ENTRIES = 1024  # entries per batch call: the buffers stay small, a few calls read a full map
MAX_ITERATIONS = 1 << 20  # get_next_key steps before giving up on a map that changes under the walk

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def syscall(number: int, *args: int) -> int:
    result = int(_libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args)))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def bpf(command: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    """bpf(2) with ``attr``; OSError with the errno on failure."""
    number = SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"bpf(2) is not wired for {platform.machine()} in aqtune")
    return syscall(number, command, ctypes.addressof(attr), ctypes.sizeof(attr))


def _elem_attr(fd: int, key: Any, value: Any) -> ctypes.Array[ctypes.c_char]:
    """union bpf_attr for the element commands: map_fd, key, value (or next_key), flags."""
    return ctypes.create_string_buffer(struct.pack(
        "=IIQQQ", fd, 0, ctypes.addressof(key) if key is not None else 0,
        ctypes.addressof(value) if value is not None else 0, 0), 32)


@dataclass(frozen=True, slots=True)
class MapRef:
    fd: int
    key_size: int
    value_size: int


KEY_CODES = {4: "=I", 8: "=Q"}


def map_lookup(m: MapRef, key: int) -> bytes | None:
    key_buf = ctypes.create_string_buffer(struct.pack(KEY_CODES[m.key_size], key), m.key_size)
    value = ctypes.create_string_buffer(m.value_size)
    try:
        bpf(BPF_MAP_LOOKUP_ELEM, _elem_attr(m.fd, key_buf, value))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return value.raw


def map_delete(m: MapRef, key: int) -> None:
    key_buf = ctypes.create_string_buffer(struct.pack(KEY_CODES[m.key_size], key), m.key_size)
    try:
        bpf(BPF_MAP_DELETE_ELEM, _elem_attr(m.fd, key_buf, None))
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def map_delete_batch(m: MapRef, keys: Sequence[int]) -> None:
    """Delete ``keys`` by BPF_MAP_DELETE_BATCH (5.6+), one syscall per BATCH_ENTRIES keys instead of one
    per key. The kernel stops at a key that is not there and says how many it deleted before it; the
    call goes on after that key (callers ask for keys they saw, so that is rare). OSError (EINVAL,
    ENOTSUPP) where the kernel or the map type has no batch deletion."""
    code = KEY_CODES[m.key_size]
    raw = ctypes.create_string_buffer(b"".join(struct.pack(code, key) for key in keys), max(m.key_size * len(keys), 1))
    at = 0
    while at < len(keys):
        count = min(BATCH_ENTRIES, len(keys) - at)
        attr = ctypes.create_string_buffer(struct.pack(
            "=QQQQIIQQ", 0, 0, ctypes.addressof(raw) + at * m.key_size, 0, count, m.fd, 0, 0), 56)
        try:
            bpf(BPF_MAP_DELETE_BATCH, attr)
            at += count
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            at += min(struct.unpack_from("=I", attr, 32)[0], count - 1) + 1  # past the missing key


def map_keys(m: MapRef) -> Iterator[int]:
    """Every key, by BPF_MAP_GET_NEXT_KEY (a hash map restarts from its first key when the one asked
    about was deleted meanwhile: a key may then come twice, which callers keyed by it absorb)."""
    code = KEY_CODES[m.key_size]
    key = ctypes.create_string_buffer(m.key_size)
    following = ctypes.create_string_buffer(m.key_size)
    attr = _elem_attr(m.fd, None, following)  # no key: the first one
    for _ in range(MAX_ITERATIONS):
        try:
            bpf(BPF_MAP_GET_NEXT_KEY, attr)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise
        yield int(struct.unpack(code, following.raw)[0])
        ctypes.memmove(key, following, m.key_size)
        attr = _elem_attr(m.fd, key, following)


def map_batch(m: MapRef, delete: bool) -> list[tuple[int, bytes]]:
    """Every entry by BPF_MAP_LOOKUP(_AND_DELETE)_BATCH (5.6+); OSError (EINVAL, ENOTSUPP) where the
    kernel or the map type has none, ENOSPC when one hash bucket holds more than a batch."""
    command = BPF_MAP_LOOKUP_AND_DELETE_BATCH if delete else BPF_MAP_LOOKUP_BATCH
    keys = ctypes.create_string_buffer(m.key_size * BATCH_ENTRIES)
    values = ctypes.create_string_buffer(m.value_size * BATCH_ENTRIES)
    in_batch, out_batch = ctypes.create_string_buffer(8), ctypes.create_string_buffer(8)
    code = KEY_CODES[m.key_size]
    found: list[tuple[int, bytes]] = []
    first = True
    while True:
        # the batch member of union bpf_attr: in_batch, out_batch, keys, values, count, map_fd,
        # elem_flags, flags
        attr = ctypes.create_string_buffer(struct.pack(
            "=QQQQIIQQ", 0 if first else ctypes.addressof(in_batch), ctypes.addressof(out_batch),
            ctypes.addressof(keys), ctypes.addressof(values), BATCH_ENTRIES, m.fd, 0, 0), 56)
        done = False
        try:
            bpf(command, attr)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                if delete and found:  # those are deleted already: theirs, and the rest stays for next time
                    return found
                raise
            done = True  # ENOENT: the last batch (its count may still be > 0)
        count = struct.unpack_from("=I", attr, 32)[0]
        raw_keys, raw_values = keys.raw, values.raw
        for i in range(count):
            found.append((int(struct.unpack_from(code, raw_keys, i * m.key_size)[0]),
                          raw_values[i * m.value_size:(i + 1) * m.value_size]))
        if done or (count == 0 and not first):
            return found
        ctypes.memmove(in_batch, out_batch, 8)
        first = False


# struct perf_event_mmap_page: where the ring's positions are in its first page (uapi perf_event.h).
DATA_HEAD, DATA_TAIL, DATA_OFFSET, DATA_SIZE = 1024, 1032, 1040, 1048
PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
RECORD_HEADER = struct.Struct("=IHH")  # struct perf_event_header: type, misc, size
# Machines whose loads and stores keep program order for the ring protocol without fences (TSO). On
# others the reader would need smp_rmb() after reading data_head and smp_mb() before writing data_tail,
# which Python cannot issue: there the daemon compiles in-process instead (ebpf.EventLayer.start_in_child).
ORDERED_MACHINES = frozenset({"x86_64", "i686"})


def parse_records(chunk: bytes) -> tuple[list[bytes], int]:
    """The PERF_SAMPLE_RAW payloads and the count of lost records in ``chunk``, the bytes between the
    ring's tail and head (unwrapped): records of a perf_event_header and a body; other types skipped."""
    samples: list[bytes] = []
    lost = 0
    at = 0
    while at + RECORD_HEADER.size <= len(chunk):
        kind, _misc, size = RECORD_HEADER.unpack_from(chunk, at)
        if size < RECORD_HEADER.size or at + size > len(chunk):
            break  # a torn or corrupt header: nothing after it can be trusted in this chunk
        if kind == PERF_RECORD_SAMPLE:
            (raw_size,) = struct.unpack_from("=I", chunk, at + 8)
            samples.append(chunk[at + 12:at + 12 + min(raw_size, size - 12)])
        elif kind == PERF_RECORD_LOST:
            lost += struct.unpack_from("=Q", chunk, at + 16)[0]  # after the u64 id
        at += size
    return samples, lost


def spans(size: int, tail: int, head: int) -> list[tuple[int, int]]:
    """The (start, end) byte ranges of a ring of ``size`` bytes holding positions ``tail`` to ``head``
    (free-running counters): one range, or two when they cross the ring's end."""
    start, length = tail % size, head - tail
    if length <= 0:
        return []
    if start + length <= size:
        return [(start, start + length)]
    return [(start, size), (0, length - (size - start))]


class PerfRing:
    """One CPU's perf buffer, mapped from its perf event descriptor (bcc's layout: 1 + pages pages)."""

    def __init__(self, fd: int, pages: int) -> None:
        self.fd = fd
        self.map = mmap.mmap(fd, (1 + pages) * mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        offset, size = struct.unpack_from("=QQ", self.map, DATA_OFFSET)
        self.offset = offset or mmap.PAGESIZE  # kernels before 4.1 leave these 0: data follows the page
        self.size = size or pages * mmap.PAGESIZE
        # The positions as aligned 8-byte loads and stores (ctypes), never torn as a byte copy could be:
        # the kernel reads data_tail while writing.
        self._head = ctypes.c_uint64.from_buffer(self.map, DATA_HEAD)
        self._tail = ctypes.c_uint64.from_buffer(self.map, DATA_TAIL)

    @property
    def pending(self) -> bool:
        return bool(self._head.value != self._tail.value)

    def read(self) -> tuple[list[bytes], int]:
        head = self._head.value
        tail = self._tail.value
        if head == tail:
            return [], 0
        # On a TSO machine (ORDERED_MACHINES) the data loads below come after the data_head load, and
        # the data_tail store after them: the kernel may then reuse what was read.
        found: tuple[list[bytes], int] = ([], 0)
        if head - tail <= self.size:  # else not a ring the kernel wrote: start again from its head
            found = parse_records(b"".join(self.map[self.offset + a:self.offset + b]
                                           for a, b in spans(self.size, tail, head)))
        self._tail.value = head
        return found

    def close(self) -> None:
        del self._head, self._tail  # the views pin the mapping: mmap refuses to close under them
        self.map.close()


@dataclass(frozen=True, slots=True)
class Held:
    """A descriptor the child handed over: what it is (bcc's word), its name, the descriptor here."""

    kind: str  # tracepoint, raw_tracepoint, kprobe, fentry, fexit, program, map, perf_buffer
    name: str
    fd: int


class FdTables:
    """The maps and perf buffer behind descriptors handed over by the compiling child: no bcc here.

    Holds every descriptor it was given (attachments too: closing them is what detaches the probes)."""

    def __init__(self, held: list[Held], maps: Mapping[str, MapRef], layouts: Mapping[str, Layout],
                 pages: int) -> None:
        self.held = held
        self.maps = dict(maps)
        self.layouts = dict(layouts)
        self.rings: list[PerfRing] = []
        self._poller = select.poll()
        self._batch: dict[str, bool] = {}  # map -> whether batch operations work on it
        try:
            for h in held:
                if h.kind == "perf_buffer":
                    self.rings.append(PerfRing(h.fd, pages))
                    self._poller.register(h.fd, select.POLLIN)
        except BaseException:  # the descriptors stay the caller's to close
            for ring in self.rings:
                ring.close()
            raise

    def _all(self, name: str, delete: bool) -> list[tuple[int, bytes]]:
        m = self.maps[name]
        if self._batch.get(name, True):
            try:
                return map_batch(m, delete)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUP, 524, errno.ENOSPC):  # 524: ENOTSUPP
                    raise
                self._batch[name] = exc.errno == errno.ENOSPC  # ENOSPC: this time only
        found = []
        for key in list(map_keys(m)):
            value = map_lookup(m, key)
            if value is not None:
                found.append((key, value))
                if delete:
                    map_delete(m, key)
        return list(dict(found).items())

    def entries(self, name: str) -> list[tuple[int, bytes]]:
        return self._all(name, delete=False)

    def drain(self, name: str) -> list[tuple[int, bytes]]:
        return self._all(name, delete=True)

    def lookup(self, name: str, key: int) -> bytes | None:
        return map_lookup(self.maps[name], key)

    def delete(self, name: str, key: int) -> None:
        map_delete(self.maps[name], key)

    def delete_many(self, name: str, keys: Collection[int]) -> None:
        m = self.maps[name]
        if self._batch.get(name, True):
            try:
                map_delete_batch(m, list(keys))
                return
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUP, 524):  # 524: ENOTSUPP
                    raise
                self._batch[name] = False
        for key in keys:
            map_delete(m, key)

    def poll(self, timeout_ms: int, record: Record, lost: Lost) -> None:
        if timeout_ms and not any(r.pending for r in self.rings):
            with contextlib.suppress(InterruptedError):
                self._poller.poll(timeout_ms)
        for ring in self.rings:
            samples, missed = ring.read()
            if missed:
                lost(missed)
            for sample in samples:
                record(sample)

    def close(self) -> None:
        for ring in self.rings:
            ring.close()
        self.rings = []
        for h in self.held:  # the attachments among them: closing the last copy detaches the probes
            with contextlib.suppress(OSError):
                os.close(h.fd)
        self.held = []

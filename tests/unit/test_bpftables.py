"""The pure parts of bpftables: value layouts from bcc's ctypes types, and perf ring record parsing on
rings built by hand (the kernel's layout: uapi perf_event.h)."""

from __future__ import annotations

import ctypes
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aqtune.collect.bpftables import (
    PERF_RECORD_LOST,
    PERF_RECORD_SAMPLE,
    SCALAR,
    Field,
    Layout,
    layout_of,
    parse_records,
    spans,
)


class Stats(ctypes.Structure):
    """Shaped like bpf/aqtune.c's accept_stats plus a char array and a signed member, as bcc types them."""

    _fields_ = [("accepts", ctypes.c_ulonglong), ("next_seq", ctypes.c_uint), ("wait", ctypes.c_uint * 4),
                ("small", ctypes.c_ushort), ("name", ctypes.c_char * 5), ("delta", ctypes.c_longlong)]


def test_a_struct_layout_decodes_each_member_at_its_offset() -> None:
    layout = layout_of(Stats)
    value = Stats(accepts=2**64 - 1, next_seq=7, small=65535, name=b"ab", delta=-3)
    value.wait[:] = [1, 2, 3, 2**32 - 1]
    assert layout.size == ctypes.sizeof(Stats) == 48  # padding after `name` to align delta
    assert layout.decode(bytes(value)) == {"accepts": 2**64 - 1, "next_seq": 7, "wait": (1, 2, 3, 2**32 - 1),
                                           "small": 65535, "name": b"ab\0\0\0", "delta": -3}
    assert layout.zero()["wait"] == (0, 0, 0, 0) and layout.zero()["name"] == bytes(5)


def test_a_plain_integer_value_is_one_field() -> None:
    for ctype, raw, expected in ((ctypes.c_uint, struct.pack("=I", 9), 9),
                                 (ctypes.c_ulonglong, struct.pack("=Q", 2**63), 2**63),
                                 (ctypes.c_int, struct.pack("=i", -1), -1)):
        assert layout_of(ctype).decode(raw) == {SCALAR: expected}


def test_layouts_travel_as_json_unchanged() -> None:
    layout = layout_of(Stats)
    again = Layout.from_json(json.loads(json.dumps(layout.to_json())))
    assert again == layout
    assert again.decode(bytes(ctypes.sizeof(Stats))) == layout.zero()


@pytest.mark.parametrize("fields, why", [
    ([["a", 0, "Q", 1], ["b", 4, "I", 1]], "overlaps"),
    ([["a", 0, "Q", 2]], "past the value"),
    ([["a", 0, "d", 1]], "bad field"),
    ([["a", -1, "I", 1]], "bad field"),
])
def test_a_layout_that_does_not_fit_is_refused(fields: list[list[object]], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Layout.from_json({"size": 8, "fields": fields})


def test_types_the_layout_cannot_decode_are_refused() -> None:
    class Inner(ctypes.Structure):
        _fields_ = [("x", ctypes.c_uint)]

    class Nested(ctypes.Structure):
        _fields_ = [("inner", Inner)]

    class Bits(ctypes.Structure):
        _fields_ = [("flag", ctypes.c_uint, 1)]

    for ctype in (Nested, Bits, ctypes.c_double):
        with pytest.raises(ValueError):
            layout_of(ctype)


def test_layout_fields_keep_their_declared_order_in_json() -> None:
    assert [f.name for f in layout_of(Stats).fields] == ["accepts", "next_seq", "wait", "small", "name", "delta"]
    assert layout_of(Stats).fields[2] == Field("wait", 12, "I", 4)


# --- perf ring records -------------------------------------------------------------------------------


def sample(payload: bytes) -> bytes:
    """A PERF_RECORD_SAMPLE with PERF_SAMPLE_RAW: header, u32 size, the payload padded to 8 bytes."""
    raw = payload + bytes(-(len(payload) + 4) % 8)
    return struct.pack("=IHHI", PERF_RECORD_SAMPLE, 0, 8 + 4 + len(raw), len(raw)) + raw


def lost(count: int) -> bytes:
    return struct.pack("=IHHQQ", PERF_RECORD_LOST, 0, 24, 77, count)


def test_samples_and_lost_counts_are_read_in_order_and_other_records_skipped() -> None:
    throttle = struct.pack("=IHHQQQ", 5, 0, 32, 1, 2, 3)  # PERF_RECORD_THROTTLE
    chunk = sample(b"first") + lost(3) + throttle + sample(b"x" * 100) + lost(2)
    samples, missed = parse_records(chunk)
    assert [s.rstrip(b"\0") for s in samples] == [b"first", b"x" * 100]
    assert len(samples[0]) == 12  # the padding stays: the layout reads its own size
    assert missed == 5


def test_a_torn_record_at_the_end_ends_the_chunk() -> None:
    whole = sample(b"kept")
    assert parse_records(whole + sample(b"torn")[:10])[0] == [whole[12:]]
    assert parse_records(whole + struct.pack("=IHH", PERF_RECORD_SAMPLE, 0, 4))[0] == [whole[12:]]  # size < header


def test_spans_of_a_ring() -> None:
    assert spans(64, 0, 0) == []
    assert spans(64, 8, 40) == [(8, 40)]
    assert spans(64, 64 * 3 + 56, 64 * 4 + 8) == [(56, 64), (0, 8)]  # across the end, counters free-running
    assert spans(64, 64, 128) == [(0, 64)]


@given(st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=12), st.integers(0, 10**6))
def test_records_written_across_the_ring_end_read_back_whole(payloads: list[bytes], tail: int) -> None:
    """Records written into a ring as the kernel does (at head modulo size, wrapping), then read back
    from tail to head through spans(): the same payloads, in order."""
    size = 512
    written = b"".join(sample(p) for p in payloads)
    if len(written) > size:
        written = written[:size - size % 8]
        payloads = []  # checked below by count only
    ring = bytearray(size)
    for i, byte in enumerate(written):
        ring[(tail + i) % size] = byte
    chunk = b"".join(bytes(ring[a:b]) for a, b in spans(size, tail, tail + len(written)))
    assert chunk == written
    found, missed = parse_records(chunk)
    assert missed == 0
    if payloads:
        assert [f[:len(p)] for f, p in zip(found, payloads, strict=True)] == payloads

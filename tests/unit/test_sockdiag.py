"""sock_diag request builders and chunk decoders, against dump bytes captured from a real kernel.

The fixtures hold every recv() chunk of three dumps (see tests/fixtures/capture_diag.py) and what ss
printed for the same sockets, so a decoding error shows up as a difference from ss, not from our own
reading of the kernel headers.
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aqtune.collect.sockdiag import (
    DumpProgress,
    NetlinkError,
    decode_inet,
    decode_unix,
    format_unix_path,
    inet_listen_request,
    unix_listen_request,
)
from aqtune.records import Listener
from tests.unit.fixture_data import (
    DATA,
    DONE,
    HEADER,
    Decoder,
    chunks,
    decode,
    expected,
    frames,
    row_dict,
    split_messages,
)

INET_FIXED = 72  # sizeof(struct inet_diag_msg)
UNIX_FIXED = 16  # sizeof(struct unix_diag_msg)
DUMPS: list[tuple[str, Decoder]] = [("inet4", decode_inet), ("inet6", decode_inet), ("unix", decode_unix)]
EVERY_CHUNK = [(name, decoder, index) for name, decoder in DUMPS for index in range(len(chunks(name)))]


def _by_address(rows: list[dict[str, object]]) -> dict[object, dict[str, object]]:
    return {row["address"]: row for row in rows}


def _attrs(message: bytes, fixed: int) -> list[tuple[int, int, int]]:
    """(offset, rta_len, rta_type) of each attribute of a well-formed message."""
    out = []
    offset = HEADER.size + fixed
    (end,) = struct.unpack_from("=I", message)
    while offset + 4 <= end:
        length, attr_type = struct.unpack_from("=HH", message, offset)
        if length < 4:
            break
        out.append((offset, length, attr_type))
        offset += (length + 3) & ~3
    return out


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _reference_rows(name: str) -> list[Listener]:
    decoder = dict(DUMPS)[name]
    return list(decode(decoder, chunks(name)).rows)


# --- the captured dumps decode to what ss printed ---------------------------------------------------

@pytest.mark.parametrize("name", ["inet4", "inet6"])
def test_inet_dump_matches_ss(name: str) -> None:
    progress = decode(decode_inet, chunks(name))
    family = "tcp" if name == "inet4" else "tcp6"
    want = [row for row in expected()["tcp"] if row["proto"] == family]
    assert progress.done and progress.skipped == 0
    got = [row_dict(row) for row in progress.rows]
    assert _by_address(got) == {address: {k: v for k, v in row.items() if k != "cookie"}
                                for address, row in _by_address(want).items()}
    assert {row.address: row.cookie for row in progress.rows} == {row["address"]: row["cookie"] for row in want}
    assert len(got) == len(want)  # no duplicates hiding behind the dict comparison


def test_inet4_fixture_covers_the_interesting_listeners() -> None:
    rows = {row.port: row for row in decode(decode_inet, chunks("inet4")).rows}
    # Backlog+1 queued and two SYN-stage drops; listen(0) holding one; a uid other than root.
    assert (rows[19002].queue, rows[19002].backlog, rows[19002].drops, rows[19002].uid) == (3, 2, 2, 65534)
    assert (rows[19001].queue, rows[19001].backlog) == (1, 0)
    assert rows[19000].address == "127.0.0.1:19000"
    assert len(chunks("inet4")) >= 3, "the v4 dump should span two data chunks plus DONE"


def test_inet6_addresses_are_bracketed() -> None:
    addresses = {row.address for row in decode(decode_inet, chunks("inet6")).rows}
    assert addresses == {"[::1]:19003", "[::]:19004"}


def test_unix_dump_matches_ss() -> None:
    progress = decode(decode_unix, chunks("unix"))
    assert progress.done and progress.skipped == 0
    got = [row_dict(row) for row in progress.rows]
    want = [{k: v for k, v in row.items() if k != "type"} for row in expected()["unix"]]
    assert len(got) == len(want)
    assert _by_address(got) == _by_address(want)
    # ss does not print Unix cookies; the kernel's are unique and non-zero.
    cookies = [row.cookie for row in progress.rows]
    assert all(cookies) and len(set(cookies)) == len(cookies)


def test_unix_dgram_socket_is_not_a_listener() -> None:
    dgram = [line.split()[4] for line in expected()["ss_xlm"] if line.startswith("u_dgr")]
    assert dgram, "the fixture should hold a datagram socket that ss -xl lists"
    addresses = {row.address for row in decode(decode_unix, chunks("unix")).rows}
    assert not addresses & set(dgram)


def test_unix_message_of_a_non_listening_type_is_ignored_not_counted() -> None:
    messages = split_messages(chunks("unix")[0])
    # udiag_type is byte 1 of unix_diag_msg; SOCK_DGRAM never listens.
    messages[1] = _patched(messages[1], HEADER.size + 1, "=B", socket.SOCK_DGRAM)
    progress = decode(decode_unix, [b"".join(messages)])
    reference = _reference_rows("unix")
    assert progress.rows == [reference[0], reference[2]]
    assert progress.skipped == 0


# --- requests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("family", "fixture"), [(socket.AF_INET, "inet4"), (socket.AF_INET6, "inet6")])
def test_inet_request_bytes(family: int, fixture: str) -> None:
    request = inet_listen_request(family, seq=0x01020304)
    length, msg_type, flags, seq, pid = HEADER.unpack_from(request)
    assert (length, len(request)) == (16 + 56, 16 + 56)  # nlmsghdr + inet_diag_req_v2
    assert (msg_type, flags, seq, pid) == (20, 0x1 | 0x300, 0x01020304, 0)  # SOCK_DIAG_BY_FAMILY, REQUEST|DUMP
    req_family, protocol, ext, pad, states = struct.unpack_from("=BBBBI", request, 16)
    assert (req_family, protocol, pad) == (family, socket.IPPROTO_TCP, 0)
    assert ext == 1 << (7 - 1)  # INET_DIAG_SKMEMINFO
    assert states == 1 << 10  # TCP_LISTEN only
    sockid = request[24:]
    assert sockid[:40] == bytes(40)  # ports, addresses, interface: no filter
    assert sockid[40:] == b"\xff" * 8  # INET_DIAG_NOCOOKIE
    # The same bytes as the independently packed request the fixtures were captured with.
    assert inet_listen_request(family) == bytes.fromhex(expected()["requests"][fixture])


def test_unix_request_bytes() -> None:
    request = unix_listen_request(seq=9)
    length, msg_type, flags, seq, pid = HEADER.unpack_from(request)
    assert (length, len(request)) == (16 + 24, 16 + 24)  # nlmsghdr + unix_diag_req
    assert (msg_type, flags, seq, pid) == (20, 0x301, 9, 0)
    req_family, protocol, pad, states, ino, show = struct.unpack_from("=BBHIII", request, 16)
    assert (req_family, protocol, pad, ino) == (socket.AF_UNIX, 0, 0, 0)
    assert states == 1 << 10
    assert show == 0x01 | 0x10 | 0x20 | 0x40  # NAME, RQLEN, MEMINFO, UID
    assert request[32:] == b"\xff" * 8
    assert unix_listen_request() == bytes.fromhex(expected()["requests"]["unix"])


def test_request_seq_defaults_to_one() -> None:
    assert HEADER.unpack_from(inet_listen_request(socket.AF_INET))[3] == 1
    assert HEADER.unpack_from(unix_listen_request())[3] == 1


# --- truncation at every byte ------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "decoder", "index"), EVERY_CHUNK,
                         ids=[f"{name}-chunk{index}" for name, _, index in EVERY_CHUNK])
def test_truncated_chunk_yields_complete_rows_and_counts_the_rest(name: str, decoder: Decoder, index: int) -> None:
    chunk = chunks(name)[index]
    located = frames(chunk)
    complete_rows = decode(decoder, [chunk]).rows
    clean_cuts = {0, len(chunk)} | {offset for offset, _, _ in located}
    for cut in range(len(chunk) + 1):
        complete = [f for f in located if f[0] + f[1] <= cut]
        want_rows = complete_rows[:sum(1 for f in complete if f[2] == DATA)]
        want_done = any(f[2] == DONE for f in complete)
        want_skipped = 0 if cut in clean_cuts or want_done else 1
        # Once as a short buffer, once as the full buffer with a short size: nothing past size is read.
        for buf in (chunk[:cut], chunk):
            progress = DumpProgress("capture", [])
            decoder(progress, buf, cut)
            assert (progress.rows, progress.skipped, progress.done) == (want_rows, want_skipped, want_done), cut


def test_second_chunk_truncated_after_the_first_was_decoded() -> None:
    first, second = chunks("inet4")[:2]
    before = decode(decode_inet, [first])
    reference = _reference_rows("inet4")
    for cut in range(len(second) + 1):
        progress = DumpProgress("capture", list(before.rows), meminfo_at=before.meminfo_at,
                                ip_text=dict(before.ip_text))
        decode_inet(progress, second, cut)
        assert progress.rows == reference[:len(progress.rows)]


# --- corrupted lengths ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["inet4", "unix"])
@pytest.mark.parametrize("bad_len", ["zero", "below_header", "past_buffer"])
def test_bad_message_length_stops_the_chunk_keeping_earlier_rows(name: str, bad_len: str) -> None:
    chunk = chunks(name)[0]
    victim = 1
    offset = frames(chunk)[victim][0]
    value = {"zero": 0, "below_header": 15, "past_buffer": len(chunk) - offset + 4}[bad_len]
    progress = decode(dict(DUMPS)[name], [_patched(chunk, offset, "=I", value)])
    assert progress.rows == _reference_rows(name)[:victim]
    assert progress.skipped == 1
    assert not progress.done


def _splice(name: str, victim: int, replacement: bytes) -> DumpProgress:
    messages = split_messages(chunks(name)[0])
    messages[victim] = replacement
    return decode(dict(DUMPS)[name], [b"".join(messages)])


def _without(name: str, victim: int) -> list[Listener]:
    rows = _reference_rows(name)[:len(split_messages(chunks(name)[0]))]
    return rows[:victim] + rows[victim + 1:]


@pytest.mark.parametrize(("name", "fixed"), [("inet4", INET_FIXED), ("unix", UNIX_FIXED)])
@pytest.mark.parametrize("victim", [0, 1])
def test_message_too_short_for_its_struct_is_skipped(name: str, fixed: int, victim: int) -> None:
    message = split_messages(chunks(name)[0])[victim]
    short = _patched(message[:HEADER.size + fixed - 4], 0, "=I", HEADER.size + fixed - 4)
    progress = _splice(name, victim, short)
    assert progress.rows == _without(name, victim)
    assert progress.skipped == 1


def test_unix_message_without_rqlen_is_skipped() -> None:
    message = split_messages(chunks("unix")[0])[1]
    kept = b"".join(message[offset:offset + ((length + 3) & ~3)]
                    for offset, length, attr_type in _attrs(message, UNIX_FIXED) if attr_type != 4)
    body = message[:HEADER.size + UNIX_FIXED] + kept
    progress = _splice("unix", 1, _patched(body, 0, "=I", len(body)))
    assert progress.rows == _without("unix", 1)
    assert progress.skipped == 1


# Which attribute gets a bad rta_len: (dump, message, attribute type, new rta_len or "past" the message).
# Message 0 of an inet dump is decoded before the SKMEMINFO offset is learnt, later ones after.
BAD_ATTRIBUTES = [
    ("inet4", 0, 8, 2),  # INET_DIAG_SHUTDOWN, the first attribute
    ("inet4", 0, 7, 3),  # INET_DIAG_SKMEMINFO
    ("inet4", 3, 7, "past"),
    ("unix", 0, 0, 2),  # UNIX_DIAG_NAME, before RQLEN
    ("unix", 1, 4, "past"),  # UNIX_DIAG_RQLEN
    ("unix", 1, 5, 0),  # UNIX_DIAG_MEMINFO, after RQLEN
    ("unix", 2, 7, "past"),  # UNIX_DIAG_UID, the last attribute
]


@pytest.mark.parametrize(("name", "victim", "attr_type", "rta_len"), BAD_ATTRIBUTES)
def test_message_with_a_bad_attribute_is_skipped_and_counted(name: str, victim: int, attr_type: int,
                                                             rta_len: int | str) -> None:
    message = split_messages(chunks(name)[0])[victim]
    fixed = INET_FIXED if name.startswith("inet") else UNIX_FIXED
    (end,) = struct.unpack_from("=I", message)
    offset = next(offset for offset, _, kind in _attrs(message, fixed) if kind == attr_type)
    value = end - offset + 4 if rta_len == "past" else int(rta_len)
    progress = _splice(name, victim, _patched(message, offset, "=H", value))
    assert progress.rows == _without(name, victim)
    assert progress.skipped == 1


def test_learnt_skmeminfo_offset_reads_only_what_it_needs() -> None:
    """Once the SKMEMINFO offset is learnt, an intact SKMEMINFO there is trusted without walking the
    attributes before it: a broken one of those does not change the figures that are read."""
    message = split_messages(chunks("inet4")[0])[3]
    offset = next(offset for offset, _, kind in _attrs(message, INET_FIXED) if kind == 8)
    progress = _splice("inet4", 3, _patched(message, offset, "=H", 0))
    assert progress.rows == _reference_rows("inet4")[:len(split_messages(chunks("inet4")[0]))]
    assert progress.skipped == 0


def test_bad_attribute_never_invents_drops() -> None:
    """Whatever the policy on counting, a row from a broken SKMEMINFO must not carry a made-up figure."""
    message = split_messages(chunks("inet4")[0])[3]
    offset = next(offset for offset, _, kind in _attrs(message, INET_FIXED) if kind == 7)
    progress = _splice("inet4", 3, _patched(message, offset, "=H", 8))  # SKMEMINFO holding 1 u32 only
    row = next((row for row in progress.rows if row.inode == _reference_rows("inet4")[3].inode), None)
    assert row is None or row.drops is None


# --- ERROR, ACK and DONE -------------------------------------------------------------------------------

def _error_message(code: int, seq: int = 1) -> bytes:
    original = inet_listen_request(socket.AF_INET, seq)[:16]
    return HEADER.pack(HEADER.size + 4 + len(original), 2, 0, seq, 0) + struct.pack("=i", code) + original


def _done_message() -> bytes:
    return HEADER.pack(20, DONE, 0x2, 1, 0) + struct.pack("=i", 0)


def test_real_error_reply_raises_with_its_errno() -> None:
    (reply,) = chunks("error")
    with pytest.raises(NetlinkError) as caught:
        decode(decode_unix, [reply])
    assert caught.value.errno == expected()["error_errno"] == errno.EINVAL


@pytest.mark.parametrize("decoder", [decode_inet, decode_unix])
def test_error_after_rows_raises_and_keeps_the_rows(decoder: Decoder) -> None:
    name = "inet4" if decoder is decode_inet else "unix"
    first_message = split_messages(chunks(name)[0])[0]
    progress = DumpProgress("capture", [])
    buf = first_message + _error_message(-errno.ENOENT)
    with pytest.raises(NetlinkError) as caught:
        decoder(progress, buf, len(buf))
    assert caught.value.errno == errno.ENOENT
    assert progress.rows == _reference_rows(name)[:1]


@pytest.mark.parametrize("decoder", [decode_inet, decode_unix])
def test_ack_ends_the_dump(decoder: Decoder) -> None:
    progress = decode(decoder, [_error_message(0)])
    assert progress.done and progress.skipped == 0 and progress.rows == []


@pytest.mark.parametrize("decoder", [decode_inet, decode_unix])
def test_done_ends_the_dump_and_nothing_after_it_is_read(decoder: Decoder) -> None:
    name = "inet4" if decoder is decode_inet else "unix"
    first_message = split_messages(chunks(name)[0])[0]
    progress = decode(decoder, [first_message + _done_message() + first_message + b"\x01\x02"])
    assert progress.done and progress.skipped == 0
    assert progress.rows == _reference_rows(name)[:1]


def test_captured_done_chunk_ends_the_dump() -> None:
    for name, decoder in DUMPS:
        progress = decode(decoder, [chunks(name)[-1]])
        assert progress.done and progress.rows == [] and progress.skipped == 0


# --- properties: arbitrary and mutated input ----------------------------------------------------------

def _check_consistent(decoder: Decoder, buf: bytes) -> DumpProgress | None:
    """Decode ``buf``; only NetlinkError may escape, and rows plus skipped must add up."""
    progress = DumpProgress("capture", [])
    try:
        decoder(progress, buf, len(buf))
    except NetlinkError:
        return None
    data_frames = sum(1 for _, _, kind in frames(buf) if kind == DATA)
    # Every data message becomes at most one row or one skip; one more skip may stand for the tail
    # that no length could locate.
    assert len(progress.rows) <= data_frames
    assert len(progress.rows) + progress.skipped <= data_frames + 1
    for row in progress.rows:
        assert row.proto in ("tcp", "tcp6", "unix")
        assert 0 <= row.queue < 1 << 32 and 0 <= row.backlog < 1 << 32
        assert row.drops is None or 0 <= row.drops < 1 << 32
        assert isinstance(row.address, str)
    return progress


FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=512), unix=st.booleans())
def test_random_bytes_never_raise(data: bytes, unix: bool) -> None:
    _check_consistent(decode_unix if unix else decode_inet, data)


@FUZZ
@given(payload=st.binary(max_size=200), msg_type=st.sampled_from([DATA, DATA, 1, 2, 3, 4, 0xFFFF]),
       declared=st.integers(0, 260), unix=st.booleans())
def test_random_messages_with_plausible_headers_never_raise(payload: bytes, msg_type: int, declared: int,
                                                            unix: bool) -> None:
    # Random bytes rarely form a header; these do, so the struct and attribute paths get exercised.
    buf = HEADER.pack(declared, msg_type, 0x2, 1, 0) + payload
    _check_consistent(decode_unix if unix else decode_inet, buf)


@FUZZ
@given(which=st.sampled_from([("inet4", 0), ("inet4", 1), ("inet6", 0), ("unix", 0)]),
       edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.integers(0, 1 << 16))
def test_mutated_real_chunks_never_raise_and_keep_rows_before_the_damage(
        which: tuple[str, int], edits: list[tuple[int, int]], cut: int) -> None:
    name, index = which
    decoder = dict(DUMPS)[name]
    original = chunks(name)[index]
    mutated = bytearray(original)
    positions = [position % len(original) for position, _ in edits]
    for position, (_, value) in zip(positions, edits, strict=True):
        mutated[position] = value
    size = len(original) - cut % (len(original) // 4)  # also cut the tail sometimes
    progress = _check_consistent(decoder, bytes(mutated[:size]))
    if progress is None:
        return
    damage = min([*positions, size])
    untouched = sum(1 for offset, length, kind in frames(original) if kind == DATA and offset + length <= damage)
    assert progress.rows[:untouched] == decode(decoder, [original]).rows[:untouched]


# --- Unix names -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "shown"), [
    (b"/run/app.sock\0", "/run/app.sock"),  # path names arrive with their terminating NUL
    (b"/run/app.sock", "/run/app.sock"),
    (b"\0aqt-capture-abstract", "@aqt-capture-abstract"),
    (b"/tmp/\xff.sock\0", "/tmp/\\xff.sock"),  # not UTF-8: shown, not raised
    (b"", ""),
])
def test_unix_names_are_shown_as_ss_shows_them(raw: bytes, shown: str) -> None:
    assert format_unix_path(raw) == shown


def test_abstract_name_with_inner_nul_bytes_is_shown_like_ss() -> None:
    # bind(b"\0with\0nul\0"): ss -xl prints @with@nul@ (checked on this machine); a raw NUL in a terminal
    # table truncates or garbles the line, and in JSON it becomes \u0000.
    assert format_unix_path(b"\0with\0nul\0") == "@with@nul@"

"""The eBPF layer's pure logic, without a kernel: the BTF reader on blobs built here, probe choice per
kernel feature set, the histogram percentile, event decoding, mode text, compile flags and the trace
line format; plus checks that the Python side and bpf/aqtune.c still describe the same things.

The BTF blobs are written from the format's definition (linux Documentation/bpf/btf.rst), not by
the reader under test, so a reader bug cannot hide behind a matching writer bug.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import signal
import socket
import struct
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aqtune.collect import btf as btf_module
from aqtune.collect import ebpf
from aqtune.collect.bpftables import layout_of
from aqtune.collect.btf import Btf, BtfError
from aqtune.collect.ebpf import (
    CAPABILITIES,
    EMIT_ALL,
    EMIT_DROPS,
    EVENT_KINDS,
    OFFSET_ADDENDS,
    OFFSETS,
    SYSCALL_ARG_OFFSETS,
    Event,
    How,
    KernelFeatures,
    ProbeState,
    Way,
    choose,
    compile_flags,
    decode_event,
    describe_mode,
    percentile,
    usable,
)
from aqtune.surfaces import trace as trace_module
from aqtune.surfaces.trace import (
    HEADER,
    KINDS,
    SUMMARY_HEADER,
    NamespaceNames,
    Summary,
    detail,
    emit_for,
    format_event,
    nearest_rank,
    parse_kinds,
)

C_SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "aqtune.c"

# --- a BTF writer -----------------------------------------------------------------------------------

KIND = {"int": 1, "ptr": 2, "array": 3, "struct": 4, "union": 5, "enum": 6, "fwd": 7, "typedef": 8,
        "volatile": 9, "const": 10, "func": 12, "func_proto": 13, "var": 14, "datasec": 15, "decl_tag": 17,
        "enum64": 19}


class BtfWriter:
    """Types in the order added (ids from 1), their names in one string section, as the kernel lays it out."""

    def __init__(self) -> None:
        self.types: list[bytes] = []
        self.strings = bytearray(b"\0")

    def name(self, text: str) -> int:
        if not text:
            return 0
        offset = len(self.strings)
        self.strings += text.encode() + b"\0"
        return offset

    def add(self, kind: str, name: str = "", vlen: int = 0, size_or_type: int = 0, body: bytes = b"",
            kind_flag: bool = False) -> int:
        info = (KIND[kind] << 24) | vlen | (1 << 31 if kind_flag else 0)
        self.types.append(struct.pack("<III", self.name(name), info, size_or_type) + body)
        return len(self.types)

    def int_type(self, name: str, size: int) -> int:
        return self.add("int", name, size_or_type=size, body=struct.pack("<I", size * 8))

    def composite(self, kind: str, name: str, size: int, members: list[tuple[str, int, int, int]]) -> int:
        """members: (name, type id, bit offset, bitfield size or 0); kind_flag encoding when any is a bitfield."""
        bitfields = any(bits for *_, bits in members)
        body = b"".join(struct.pack("<III", self.name(member), type_id,
                                    (bits << 24 | offset) if bitfields else offset)
                        for member, type_id, offset, bits in members)
        return self.add(kind, name, len(members), size, body, kind_flag=bitfields)

    def enum(self, name: str, values: dict[str, int], signed: bool = False) -> int:
        body = b"".join(struct.pack("<Ii" if signed else "<II", self.name(k), v) for k, v in values.items())
        return self.add("enum", name, len(values), 4, body, kind_flag=signed)

    def enum64(self, name: str, values: dict[str, int], signed: bool = False) -> int:
        body = b"".join(struct.pack("<III", self.name(k), v & 0xFFFFFFFF, (v >> 32) & 0xFFFFFFFF)
                        for k, v in values.items())
        return self.add("enum64", name, len(values), 8, body, kind_flag=signed)

    def blob(self) -> bytes:
        types = b"".join(self.types)
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(self.strings))
        return header + types + bytes(self.strings)


def sample_btf() -> bytes:
    """A small kernel-like BTF: the kinds with bodies of every size come first, so indexing the
    structs after them proves the reader skipped each body by the right length."""
    w = BtfWriter()
    u8, u16, u32, u64 = (w.int_type(n, s) for n, s in (("u8", 1), ("u16", 2), ("unsigned int", 4), ("u64", 8)))
    u32_t = w.add("typedef", "__u32", size_or_type=u32)
    const_u32 = w.add("const", size_or_type=u32_t)
    w.add("array", body=struct.pack("<III", u8, u32, 16))
    proto = w.add("func_proto", vlen=2, size_or_type=u32, body=struct.pack("<IIII", w.name("a"), u32, 0, u64))
    w.add("func", "tcp_conn_request", size_or_type=proto)
    var = w.add("var", "some_var", size_or_type=u32, body=struct.pack("<I", 1))
    w.add("datasec", ".data", vlen=1, size_or_type=4, body=struct.pack("<III", var, 0, 4))
    w.add("decl_tag", "tag", size_or_type=var, body=struct.pack("<i", -1))
    w.add("fwd", "sock")  # a declaration named like the struct: must not shadow it
    w.add("volatile", size_or_type=u32)
    # struct sock_common { u32 skc_daddr; u32 skc_rcv_saddr; union { u32 skc_hash; struct { u16 skc_dport;
    #   u16 skc_num; }; }; u16 skc_family; volatile u8 skc_state; u8 skc_reuse:4, skc_reuseport:1, skc_odd:3; }
    ports = w.composite("struct", "", 4, [("skc_dport", u16, 0, 0), ("skc_num", u16, 16, 0)])
    hash_union = w.composite("union", "", 4, [("skc_hash", u32, 0, 0), ("", ports, 0, 0)])
    volatile_u8 = w.add("volatile", size_or_type=u8)
    common = w.composite("struct", "sock_common", 16, [
        ("skc_daddr", u32, 0, 0), ("skc_rcv_saddr", const_u32, 32, 0), ("", hash_union, 64, 0),
        ("skc_family", u16, 96, 0), ("skc_state", volatile_u8, 112, 0),
        ("skc_reuse", u8, 120, 4), ("skc_reuseport", u8, 124, 1), ("skc_odd", u8, 125, 3)])
    common_t = w.add("typedef", "sock_common_t", size_or_type=common)
    ns_common = w.composite("struct", "ns_common", 24, [("stashed", u64, 0, 0), ("inum", u32, 128, 0)])
    w.composite("struct", "net", 200, [("passive", u32, 0, 0), ("ns", ns_common, 176 * 8, 0)])
    w.composite("struct", "sock", 700, [
        ("__sk_common", common_t, 0, 0), ("sk_socket", u64, 288 * 8, 0), ("sk_ack_backlog", u32_t, 600 * 8, 0),
        ("sk_max_ack_backlog", u32_t, 604 * 8, 0)])
    w.enum("skb_drop_reason", {"SKB_NOT_DROPPED_YET": 0, "SKB_DROP_REASON_TCP_LISTEN_OVERFLOW": 40})
    w.enum("signed_enum", {"MINUS_ONE": -1, "SEVEN": 7}, signed=True)
    w.enum64("big_enum", {"BIG_ONE": 1 << 40, "BIG_SMALL": 3})
    w.enum64("signed_big", {"BIG_MINUS_TWO": -2}, signed=True)
    w.enum("unsigned_high", {"NET_NS_INIT_INO": 0xEFFFFFF9})  # kind_flag 0: unsigned, as in the kernel
    w.enum64("unsigned_top", {"TOP": 1 << 63})
    return w.blob()


@pytest.fixture(scope="module")
def btf() -> Btf:
    return Btf(sample_btf())


# --- Btf ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "offset"), [
    ("sock.__sk_common.skc_daddr", 0),
    ("sock.__sk_common.skc_rcv_saddr", 4),  # through a const qualifier on a typedef
    ("sock.__sk_common.skc_hash", 8),  # inside the anonymous union
    ("sock.__sk_common.skc_num", 10),  # inside an anonymous struct inside the anonymous union
    ("sock.__sk_common.skc_dport", 8),
    ("sock.__sk_common.skc_state", 14),  # a volatile member
    ("sock.sk_ack_backlog", 600),
    ("sock.sk_max_ack_backlog", 604),
    ("sock.sk_socket", 288),
    ("net.ns.inum", 192),  # a named struct member, then its member
    ("sock_common.skc_family", 12),
    ("sock", 0),
])
def test_offset_descends_typedefs_qualifiers_and_anonymous_members(btf: Btf, path: str, offset: int) -> None:
    assert btf.offset(path) == offset


@pytest.mark.parametrize(("path", "message"), [
    ("sockx.sk_ack_backlog", "no struct sockx"),
    ("sock.sk_nothing", "no member 'sk_nothing'"),
    ("sock.__sk_common.skc_nothing", "no member 'skc_nothing'"),
    ("sock.sk_ack_backlog.deeper", "no member 'deeper'"),  # an int has no members
    ("sock.skc_num", "no member 'skc_num'"),  # only anonymous members are looked into, not __sk_common
    ("sock.__sk_common.skc_reuseport", "a 1-bit bitfield, not addressable"),
    ("sock.__sk_common.skc_odd", "a 3-bit bitfield, not addressable"),
    ("skb_drop_reason.x", "no struct skb_drop_reason"),  # an enum is not a struct
])
def test_offset_errors_name_what_is_missing(btf: Btf, path: str, message: str) -> None:
    with pytest.raises(BtfError, match=re.escape(message)):
        btf.offset(path)


def test_offset_refuses_a_byte_aligned_bitfield(btf: Btf) -> None:
    with pytest.raises(BtfError, match="bitfield"):
        btf.offset("sock.__sk_common.skc_reuse")  # skc_reuse:4 at bit 120


@pytest.mark.parametrize(("enum", "name", "value"), [
    ("skb_drop_reason", "SKB_DROP_REASON_TCP_LISTEN_OVERFLOW", 40),
    ("skb_drop_reason", "SKB_NOT_DROPPED_YET", 0),
    ("signed_enum", "MINUS_ONE", -1),
    ("signed_enum", "SEVEN", 7),
    ("big_enum", "BIG_ONE", 1 << 40),
    ("big_enum", "BIG_SMALL", 3),
    ("signed_big", "BIG_MINUS_TWO", -2),
])
def test_enum_values_from_enum_and_enum64(btf: Btf, enum: str, name: str, value: int) -> None:
    assert btf.enum_value(enum, name) == value


@pytest.mark.parametrize(("enum", "name", "value"), [
    ("unsigned_high", "NET_NS_INIT_INO", 0xEFFFFFF9),  # the host netns inode, read as a negative once
    ("unsigned_top", "TOP", 1 << 63),
])
def test_unsigned_enum_values_stay_unsigned(btf: Btf, enum: str, name: str, value: int) -> None:
    assert btf.enum_value(enum, name) == value


def test_enum_errors(btf: Btf) -> None:
    with pytest.raises(BtfError, match="no enum nope in BTF"):
        btf.enum_value("nope", "X")
    with pytest.raises(BtfError, match="enum skb_drop_reason has no SKB_DROP_REASON_NOPE"):
        btf.enum_value("skb_drop_reason", "SKB_DROP_REASON_NOPE")
    with pytest.raises(BtfError, match="no enum sock"):  # a struct is not an enum
        btf.enum_value("sock", "X")


def test_blob_and_file_errors(tmp_path: Path) -> None:
    with pytest.raises(BtfError, match="too short"):
        Btf(b"\x9f\xeb")
    with pytest.raises(BtfError, match="not BTF"):
        Btf(b"\x00" * 24)
    missing = tmp_path / "vmlinux"
    with pytest.raises(BtfError, match=f"{missing}: No such file or directory"):
        Btf.load(str(missing))
    missing.write_bytes(sample_btf())
    assert Btf.load(str(missing)).offset("sock.sk_ack_backlog") == 600


# --- probe choice ---------------------------------------------------------------------------------------

SYSCALLS = frozenset({"syscalls:sys_enter_accept4", "syscalls:sys_enter_accept", "syscalls:sys_exit_accept4",
                      "syscalls:sys_exit_accept", "syscalls:sys_enter_listen", "syscalls:sys_exit_listen"})
COMMON_TPS = SYSCALLS | {"skb:kfree_skb", "tcp:tcp_retransmit_synack", "sock:inet_sock_set_state"}
X86 = "x86_64"

# This VM: 6.18, sk_data_ready tracepoint, kfree_skb with rx_sk and the reason, BTF, no kprobes (fentry
# is refused, which only loading shows).
KERNEL_6_18 = KernelFeatures(COMMON_TPS | {"sock:sk_data_ready"}, kfree_skb_has_rx_sk=True,
                             listen_overflow_reason=40, kprobes=False, btf=True, machine=X86, task_pt_regs=True)
# Debian 12's 6.1: no sk_data_ready tracepoint, kfree_skb without rx_sk or TCP_LISTEN_OVERFLOW, kprobes.
KERNEL_6_1 = KernelFeatures(COMMON_TPS, kfree_skb_has_rx_sk=False, listen_overflow_reason=None, kprobes=True,
                            btf=True, machine=X86, task_pt_regs=True)
NOTHING = KernelFeatures(frozenset(), kfree_skb_has_rx_sk=False, listen_overflow_reason=None, kprobes=False,
                         btf=False, machine=X86, task_pt_regs=False)


def kinds(chosen: dict[str, Way | str]) -> dict[str, str]:
    return {capability: way.kind if isinstance(way, Way) else "none" for capability, way in chosen.items()}


def test_choose_on_a_6_18_like_kernel_takes_tracepoints_and_leaves_syn_overflow_to_a_function() -> None:
    chosen = choose(KERNEL_6_18)
    assert chosen["enqueue"] == Way("raw_tracepoint", "sock:sk_data_ready", "on_sk_data_ready")
    assert chosen["ack_overflow"] == Way("raw_tracepoint", "skb:kfree_skb", "on_kfree_skb")
    # No tracepoint sees a SYN dropped at a full queue: only tcp_conn_request, by fentry (BTF says it may
    # be tried; the load then proves it) or kprobe.
    assert chosen["syn_overflow"] == CAPABILITIES["syn_overflow"][0]
    assert kinds(chosen) == {"enqueue": "raw_tracepoint", "ack_overflow": "raw_tracepoint",
                             "syn_overflow": "function", "synack_retransmits": "raw_tracepoint",
                             "accept": "tracepoint", "listen": "tracepoint"}


def test_choose_on_a_6_1_like_kernel_falls_back_to_functions() -> None:
    chosen = choose(KERNEL_6_1)
    enqueue, ack = chosen["enqueue"], chosen["ack_overflow"]
    assert isinstance(enqueue, Way) and isinstance(ack, Way)
    assert (enqueue.kind, enqueue.target, enqueue.fentry_define) == (
        "function", "inet_csk_complete_hashdance", "FENTRY_COMPLETE_HASHDANCE")
    assert (ack.kind, ack.target, ack.program) == (
        "function", "tcp_v4_syn_recv_sock+tcp_v6_syn_recv_sock", "on_syn_recv_sock")
    assert kinds(chosen)["syn_overflow"] == "function"
    assert kinds(chosen)["synack_retransmits"] == "raw_tracepoint"


def test_choose_on_a_kernel_with_nothing_gives_every_reason() -> None:
    chosen = choose(NOTHING)
    assert all(isinstance(why, str) for why in chosen.values()), chosen
    assert chosen["enqueue"] == ("sock:sk_data_ready: no tracepoint sock:sk_data_ready; "
                                 "inet_csk_complete_hashdance: kprobes absent and no BTF for fentry")
    assert chosen["ack_overflow"] == ("skb:kfree_skb: no tracepoint skb:kfree_skb; tcp_v4_syn_recv_sock+"
                                      "tcp_v6_syn_recv_sock: kprobes absent and no BTF for fentry")
    # Without BTF the arguments cannot come from the saved registers: the entry tracepoints are needed too.
    assert chosen["accept"] == ("syscalls:sys_exit_accept4+syscalls:sys_exit_accept: no tracepoint "
                                "syscalls:sys_exit_accept4, syscalls:sys_exit_accept, syscalls:sys_enter_accept4, "
                                "syscalls:sys_enter_accept")


def test_kfree_skb_needs_rx_sk_and_the_reason() -> None:
    kfree = CAPABILITIES["ack_overflow"][0]
    without_reason = KernelFeatures(KERNEL_6_18.tracepoints, True, None, False, False, X86, False)
    without_rx_sk = KernelFeatures(KERNEL_6_18.tracepoints, False, 40, False, True, X86, True)
    for features in (without_reason, without_rx_sk):
        assert usable(kfree, features) == "kfree_skb has no rx_sk or no TCP_LISTEN_OVERFLOW reason on this kernel"
    # Neither kprobes nor BTF: the function fallback cannot work either, and the reason says both.
    assert choose(without_reason)["ack_overflow"] == (
        "skb:kfree_skb: kfree_skb has no rx_sk or no TCP_LISTEN_OVERFLOW reason on this kernel; "
        "tcp_v4_syn_recv_sock+tcp_v6_syn_recv_sock: kprobes absent and no BTF for fentry")
    assert choose(without_rx_sk)["ack_overflow"] == CAPABILITIES["ack_overflow"][1]


@pytest.mark.parametrize(("kprobes", "has_btf", "why"), [
    (True, False, None), (False, True, None), (True, True, None),
    (False, False, "kprobes absent and no BTF for fentry"),
])
def test_function_ways_need_kprobes_or_btf(kprobes: bool, has_btf: bool, why: str | None) -> None:
    features = KernelFeatures(frozenset(), False, None, kprobes, has_btf, X86, has_btf)
    assert usable(CAPABILITIES["syn_overflow"][0], features) == why


def test_a_multi_tracepoint_way_needs_every_tracepoint() -> None:
    accept = CAPABILITIES["accept"][0]
    only_accept4 = frozenset({"syscalls:sys_exit_accept4"})
    assert usable(accept, KernelFeatures(only_accept4, False, None, False, True, X86, True)) == (
        "no tracepoint syscalls:sys_exit_accept")
    assert usable(accept, KernelFeatures(SYSCALLS, False, None, False, True, X86, True)) is None


EXITS = frozenset(tp for tp in SYSCALLS if ":sys_exit_" in tp)


@pytest.mark.parametrize("capability", ["accept", "listen"])
def test_syscall_arguments_come_from_saved_registers_or_entry_tracepoints(capability: str) -> None:
    way = CAPABILITIES[capability][0]
    assert way.reads_syscall_args
    registers = KernelFeatures(EXITS, False, None, False, True, X86, True)
    assert usable(way, registers) is None
    assert "-DOFF_SYSCALL_ARG0=0" in compile_flags(full_btf({}), registers, set())
    # No bpf_task_pt_regs() (before 5.15, or no BTF to tell), or registers this code does not know:
    # the entry tracepoints must be there as well, and the exits are compiled to use what they keep.
    for features in (replace(registers, task_pt_regs=False), replace(registers, machine="aarch64")):
        needed = ", ".join(ebpf.entry_of(tp) for tp in way.target.split("+"))
        assert usable(way, features) == f"no tracepoint {needed}"
        assert usable(way, replace(features, tracepoints=SYSCALLS)) is None
        assert not any("OFF_SYSCALL_ARG" in flag for flag in compile_flags(full_btf({}), features, set()))


# --- attach states (a fake bcc object, no kernel) --------------------------------------------------------


class FakeBpf:
    def __init__(self, fail: str | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[str, str, str]] = []

    def attach_raw_tracepoint(self, tp: str, fn_name: str) -> None:
        self.calls.append(("raw", tp, fn_name))
        if self.fail:
            raise Exception(self.fail)

    def attach_tracepoint(self, tp: str, fn_name: str) -> None:
        self.calls.append(("tp", tp, fn_name))

    def attach_kprobe(self, event: str, fn_name: str) -> None:
        self.calls.append(("kprobe", event, fn_name))
        if self.fail:
            raise Exception(self.fail)


def test_attach_states_say_how_or_why_not() -> None:
    conn = CAPABILITIES["syn_overflow"][0]
    refused = {"tcp_conn_request": "fentry refused (EPERM)"}
    no_kprobes = KERNEL_6_18
    with_kprobes = KernelFeatures(KERNEL_6_18.tracepoints, True, 40, True, True, X86, True)
    no_btf = KernelFeatures(KERNEL_6_18.tracepoints, True, 40, True, False, X86, False)
    bpf = FakeBpf()
    attach = ebpf._attach
    assert attach(bpf, conn, "tcp_conn_request", no_kprobes, {}) == ProbeState.by(How.FENTRY)
    assert attach(bpf, conn, "tcp_conn_request", no_kprobes, refused) == ProbeState.failed(
        "fentry refused (EPERM); kprobes absent (no /sys/kernel/tracing/kprobe_events)")
    assert attach(bpf, conn, "tcp_conn_request", with_kprobes, refused) == ProbeState.by(
        How.KPROBE, "fentry refused (EPERM)")
    assert attach(bpf, conn, "tcp_conn_request", no_btf, {}) == ProbeState.by(How.KPROBE, "fentry not tried (no BTF)")
    assert bpf.calls == [("kprobe", "tcp_conn_request", "on_conn_request")] * 2
    assert attach(FakeBpf("cannot attach kprobe, probe entry may not exist\nmore"), conn, "tcp_conn_request",
                  no_btf, {}) == ProbeState.failed("cannot attach kprobe, probe entry may not exist")
    raw = CAPABILITIES["enqueue"][0]
    bpf = FakeBpf()
    assert attach(bpf, raw, "sock:sk_data_ready", no_kprobes, {}) == ProbeState.by(How.RAW_TRACEPOINT)
    assert bpf.calls == [("raw", "sk_data_ready", "on_sk_data_ready")]  # the raw name has no category
    assert attach(FakeBpf("boom"), raw, "sock:sk_data_ready", no_kprobes, {}) == ProbeState.failed("boom")


@pytest.mark.parametrize(("state", "text"), [
    (ProbeState.by(How.RAW_TRACEPOINT), "attached (raw tracepoint)"),
    (ProbeState.by(How.TRACEPOINT), "attached (tracepoint)"),
    (ProbeState.by(How.TRACEPOINT, "arguments kept by syscalls:sys_enter_accept4"),
     "attached (tracepoint; arguments kept by syscalls:sys_enter_accept4)"),
    (ProbeState.by(How.FENTRY), "attached (fentry)"),
    (ProbeState.by(How.KPROBE, "fentry refused (EPERM)"), "attached (kprobe; fentry refused (EPERM))"),
    (ProbeState.failed("fentry refused (EPERM); kprobes absent (no /sys/kernel/tracing/kprobe_events)"),
     "not attached: fentry refused (EPERM); kprobes absent (no /sys/kernel/tracing/kprobe_events)"),
])
def test_probe_state_text_is_what_status_has_always_shown(state: ProbeState, text: str) -> None:
    """status --json's ebpf.probes, the journal's "eBPF probe ..." lines and trace's stderr show this text."""
    assert (state.text, str(state), state.attached) == (text, text, text.startswith("attached ("))


@pytest.mark.parametrize(("text", "errno_value", "expected"), [
    ("Need super-user privileges to run", 0, "fentry refused (EPERM)"),
    ("bpf_prog_load: Operation not permitted", 0, "fentry refused (EPERM)"),
    ("something", 1, "fentry refused (EPERM)"),
    ("load failed: 524", 0, "fentry not supported for this function (ENOTSUPP)"),
    ("Failed to load BPF program\nverifier log", 0, "fentry failed: Failed to load BPF program"),
])
def test_fentry_failure_text(text: str, errno_value: int, expected: str) -> None:
    ctypes.set_errno(errno_value)
    try:
        assert ebpf._errno_text(Exception(text)) == expected
    finally:
        ctypes.set_errno(0)


# --- percentile -----------------------------------------------------------------------------------------


def bucket_bound_ms(bucket: int) -> float:
    return 2 ** (bucket + 1) / 1000.0  # bucket i holds [2^i, 2^(i+1)) microseconds


def test_percentile_examples() -> None:
    histogram = [0] * ebpf.WAIT_BUCKETS
    histogram[18], histogram[19], histogram[20] = 1, 2, 2  # waits of 0.3, 0.6, 0.9, 1.2 and 1.5 s
    assert percentile(histogram, 0.5) == 1048.576
    assert percentile(histogram, 0.99) == 2097.152
    assert percentile(histogram, 0.2) == 524.288  # exactly the first wait's rank
    assert percentile([3] + [0] * 31, 0.99) == 0.002  # under 2 us
    assert percentile([0] * 31 + [1], 0.5) == bucket_bound_ms(31)


@given(st.lists(st.integers(min_value=0, max_value=1000), min_size=ebpf.WAIT_BUCKETS, max_size=ebpf.WAIT_BUCKETS)
       .filter(any), st.floats(min_value=0.01, max_value=1.0))
def test_percentile_is_the_bound_of_the_bucket_holding_the_rank(histogram: list[int], fraction: float) -> None:
    value = percentile(histogram, fraction)
    bucket = round(math.log2(value * 1000)) - 1
    assert value == bucket_bound_ms(bucket)
    rank = fraction * sum(histogram)
    assert sum(histogram[:bucket]) < rank <= sum(histogram[:bucket + 1])
    assert histogram[bucket] > 0
    assert percentile(histogram, 0.5) <= percentile(histogram, 0.99)


# --- events ---------------------------------------------------------------------------------------------


def c_block(pattern: str) -> str:
    found = re.search(pattern + r"\s*\{(.*?)\};", C_SOURCE.read_text(), re.S)
    assert found, f"{pattern} not found in {C_SOURCE}"
    return found.group(1)


# How bcc's table.event() types the members of `struct event` (bcc/table.py, _get_event_class).
BCC_CTYPES = {"u64": ctypes.c_ulonglong, "u32": ctypes.c_uint, "u16": ctypes.c_ushort, "u8": ctypes.c_ubyte,
              "char": ctypes.c_char}


def bcc_event_class() -> type[ctypes.Structure]:
    """The ctypes type bcc generates for `struct event`, built the same way from the C source."""
    fields: list[tuple[str, Any]] = []
    for line in c_block(r"struct event").splitlines():
        declared = re.match(r"\s*(u64|u32|u16|u8|char)\s+(\w+)(?:\[(\d+)\])?;", line)
        if declared:
            kind, name, length = declared.groups()
            fields.append((name, BCC_CTYPES[kind] * int(length) if length else BCC_CTYPES[kind]))
    return type("Event", (ctypes.Structure,), {"_fields_": fields})


def packed(kind: int = 2, family: int = socket.AF_INET, local: bytes = socket.inet_aton("127.0.0.1"),
           peer: bytes = socket.inet_aton("127.0.0.2"), comm: bytes = b"aqt-listen") -> Any:
    raw = bcc_event_class()(ts=123_456_789, inode=4242, value=300_400_500, kind=kind, netns=4026532315, queue=5,
                            backlog=4, pid=777, port=8080, peer_port=51234, family=family)
    ctypes.memmove(raw.local, local, len(local))
    ctypes.memmove(raw.peer, peer, len(peer))
    raw.comm = comm
    # As the layer has it: the record's bytes (a perf sample), decoded by the layout of bcc's type.
    return layout_of(type(raw)).decode(bytes(raw) + bytes(4))  # a raw sample is padded to 8 bytes


def test_decode_v4_event_with_a_peer() -> None:
    event = decode_event(packed())
    assert event == Event(123_456_789, "ack-overflow", 4026532315, 4242, socket.AF_INET, "127.0.0.1", 8080,
                          "127.0.0.2", 51234, 5, 4, 300_400_500, 777, "aqt-listen")


def test_decode_v6_event() -> None:
    event = decode_event(packed(kind=5, family=socket.AF_INET6, local=socket.inet_pton(socket.AF_INET6, "::1"),
                                peer=socket.inet_pton(socket.AF_INET6, "fe80::1:2")))
    assert (event.kind, event.local, event.peer) == ("accept", "::1", "fe80::1:2")


def test_decode_event_without_a_peer_and_an_unknown_kind() -> None:
    event = decode_event(packed(kind=1, peer=b"", comm=b"x" * 16))
    assert (event.kind, event.peer, event.comm) == ("enqueue", None, "x" * 16)
    assert decode_event(packed(kind=99)).kind == "99"


def test_decode_event_keeps_a_hostile_process_name_as_text() -> None:
    """comm is whatever a process called itself (prctl PR_SET_NAME): decoded, never trusted; trace escapes it."""
    event = decode_event(packed(comm=b"\x1b[31m\xff\n"))
    assert event.comm == "\x1b[31m\ufffd\n"


def test_event_kinds_and_emit_flags_match_the_c_source() -> None:
    enum = dict((name, int(value)) for name, value in re.findall(r"EV_(\w+)\s*=\s*(\d+)", c_block(r"enum event_kind")))
    assert {value: name.lower().replace("_", "-") for name, value in enum.items()} == EVENT_KINDS
    source = C_SOURCE.read_text()
    assert re.search(rf"#define EMIT_ALL {EMIT_ALL}\b", source)
    assert re.search(rf"#define EMIT_DROPS {EMIT_DROPS}\b", source)
    # Compiled in, not read from a map on every connection.
    assert re.search(r"int wanted\(u32 kind, const void \*sk\)\s*\{[^}]*EMIT_FLAGS[^}]*ONLY_NETNS", source)
    assert "BPF_ARRAY(config" not in source


def test_compile_flags_carry_the_emit_mode_and_the_namespace() -> None:
    flags = compile_flags(full_btf({}), KERNEL_6_18, set(), emit=EMIT_ALL, netns_inode=4026532315)
    assert flags[:2] == [f"-DEMIT_FLAGS={EMIT_ALL}", "-DONLY_NETNS=4026532315u"]
    assert compile_flags(full_btf({}), KERNEL_6_18, set())[:2] == ["-DEMIT_FLAGS=0", "-DONLY_NETNS=0u"]


def test_every_probe_program_offset_and_fentry_define_exists_in_the_c_source() -> None:
    source = C_SOURCE.read_text()
    for capability, ways in CAPABILITIES.items():
        for way in ways:
            assert re.search(rf"\bint {way.program}\(", source), (capability, way.program)
            if way.reads_syscall_args:  # the entry program _attach names where registers cannot serve
                assert re.search(r"\bint on_syscall_enter\(", source)
            if way.fentry_define:
                assert f"#ifdef {way.fentry_define}" in source, way.fentry_define
    used = set(re.findall(r"\bOFF_[A-Z0-9_]+", source))
    assert used == set(OFFSETS) | set(SYSCALL_ARG_OFFSETS[X86]), "offsets the C source reads vs compile_flags'"


# --- arrival stamps and the oldest queued connection ------------------------------------------------


def test_stamp_constants_match_the_c_source() -> None:
    source = C_SOURCE.read_text()
    assert f"#define STAMP_SLOTS (1 << {ebpf.STAMP_SLOTS.bit_length() - 1})" in source
    assert re.search(rf"#define STAMP_MULTIPLIER {ebpf.STAMP_MULTIPLIER}u\b", source)
    assert "((u32)inode * STAMP_MULTIPLIER + seq) & (STAMP_SLOTS - 1)" in source
    assert "u64 tag = inode << 32 | seq;" in source


def test_stamp_index_wraps_as_u32_arithmetic_does() -> None:
    inode, seq = 0x1_2345_6789, 0xFFFF_FFFF  # only the inode's low 32 bits count, as in the C cast
    expected = ((0x2345_6789 * ebpf.STAMP_MULTIPLIER) % 2**32 + seq) % 2**32 % ebpf.STAMP_SLOTS
    assert ebpf.stamp_index(inode, seq) == expected
    assert ebpf.stamp_index(7, 10) + 1 == ebpf.stamp_index(7, 11)  # a listener's run is consecutive
    assert ebpf.stamp_tag(7, 10) == 7 << 32 | 10


@pytest.mark.parametrize(("seq_base", "enqueued", "accepts", "next_seq", "queue", "expected"), [
    (100, 5, 0, 0, 3, (103, 3)),  # the sweep's queue: the last 3 of 101..105
    (100, 5, 0, 0, 0, (106, 0)),
    (100, 5, 2, 0, 3, (103, 3)),  # whatever the accepts: 2 taken by io_uring, unseen, counts no differently
    (100, 5, 0, 0, None, (101, 5)),  # nothing accepted yet: all since the first
    (100, 5, 2, 103, None, (103, 3)),  # the next accept() takes 103
    (100, 5, 5, 106, None, (106, 0)),  # all taken
    (100, 5, 6, 107, None, (107, 0)),  # an accept ran ahead of its enqueue's probe
    (100, 5, 1, 0, None, None),  # accepts counted that had no place in the numbering
    (2**32 - 2, 5, 0, 0, 2, (2, 2)),  # numbers wrap: ..., 2**32 - 1, 0, 1, 2, 3
])
def test_oldest_queued(seq_base: int, enqueued: int, accepts: int, next_seq: int, queue: int | None,
                       expected: tuple[int, int] | None) -> None:
    assert ebpf.oldest_queued(seq_base, enqueued, accepts, next_seq, queue) == expected


def accept_word(inode: int, now_ns: int) -> int:
    """What on_accept_exit stores for socket ``inode`` accepted at ``now_ns`` (u64 arithmetic)."""
    time_bits = 64 - ebpf.ACCEPT_TAG_BITS
    return ((inode >> ebpf.ACCEPT_SLOT_BITS) << time_bits | (now_ns >> ebpf.ACCEPT_TIME_SHIFT)
            & ((1 << time_bits) - 1)) & (2**64 - 1)


def test_accept_time_constants_match_the_c_source() -> None:
    source = C_SOURCE.read_text()
    for name in ("ACCEPT_SLOT_BITS", "ACCEPT_TAG_BITS", "ACCEPT_TIME_SHIFT"):
        assert re.search(rf"#define {name} {getattr(ebpf, name)}\b", source), name
    assert "(child >> ACCEPT_SLOT_BITS) << (64 - ACCEPT_TAG_BITS)" in source
    assert "(now >> ACCEPT_TIME_SHIFT) & ((1ull << (64 - ACCEPT_TAG_BITS)) - 1)" in source


@pytest.mark.parametrize("inode", [1, 6_420_748, 2**19 - 1, 2**19, 2**32 - 1])
def test_accept_time_round_trip_and_other_sockets_in_the_slot(inode: int) -> None:
    now_ns = 123_456_789_012_345
    word = accept_word(inode, now_ns)
    at = ebpf.accept_time_ns(inode, word)
    assert at is not None and now_ns - 1024 < at <= now_ns  # to 1.024 us
    # Another socket with the same slot (its inode 2^19 apart) is told apart by the tag.
    for other in (inode + 2**19, inode - 2**19):
        if other > 0:
            assert ebpf.accept_time_slot(other) == ebpf.accept_time_slot(inode)
            assert ebpf.accept_time_ns(other, word) is None
    assert ebpf.accept_time_ns(inode, 0) is None  # a slot never written, even for a small inode


# --- compile flags --------------------------------------------------------------------------------------


def full_btf(offsets: dict[str, int]) -> Btf:
    """A BTF holding every member path compile_flags asks for, at the given byte offsets."""
    w = BtfWriter()
    u32 = w.int_type("u32", 4)
    paths = [path for path, _ in (OFFSETS | SYSCALL_ARG_OFFSETS[X86]).values()] + list(OFFSET_ADDENDS.values())
    structs: dict[str, dict[str, int | str]] = {}
    for path in paths:
        parts = path.split(".")
        for i, member in enumerate(parts[1:], start=1):
            owner = parts[0] if i == 1 else f"{parts[0]}_{parts[i - 1]}"
            last = i == len(parts) - 1
            structs.setdefault(owner, {})[member] = "u32" if last else f"{parts[0]}_{member}"
    ids: dict[str, int] = {"u32": u32}
    # Inner structs first, so their ids exist when the outer ones name them.
    pending = dict(structs)
    while pending:
        for owner, members in list(pending.items()):
            if all(kind in ids for kind in members.values()):
                listed = [(m, ids[str(kind)], offsets.get(f"{owner}.{m}", 0) * 8, 0) for m, kind in members.items()]
                ids[owner] = w.composite("struct", owner, 4096, listed)
                del pending[owner]
    return Btf(w.blob())


def test_compile_flags_from_btf_sum_the_addends() -> None:
    offsets = {"sock.__sk_common": 0, "sock___sk_common.skc_num": 14, "sock.sk_ack_backlog": 600,
               "sock.sk_receive_queue": 200, "sk_buff_head.qlen": 16, "socket_alloc.vfs_inode": 64,
               "inode.i_ino": 72, "net.ns": 176, "net_ns.inum": 16}
    flags = compile_flags(full_btf(offsets), KERNEL_6_18, {"FENTRY_CONN_REQUEST"})
    assert "-DOFF_SKC_NUM=14" in flags
    assert "-DOFF_ACK_BACKLOG=600" in flags
    assert "-DOFF_SK_RECEIVE_QUEUE_QLEN=216" in flags
    assert "-DOFF_SOCKET_INODE=136" in flags
    assert "-DOFF_NET_INUM=192" in flags
    assert flags[-2:] == ["-DREASON_LISTEN_OVERFLOW=40", "-DFENTRY_CONN_REQUEST"]
    assert len([flag for flag in flags if flag.startswith("-DOFF_")]) == len(OFFSETS) + len(SYSCALL_ARG_OFFSETS[X86])


def test_compile_flags_without_btf_use_header_expressions() -> None:
    flags = compile_flags(None, KERNEL_6_1, {"FENTRY_SYN_RECV_SOCK", "FENTRY_CONN_REQUEST"})
    assert "-DOFF_ACK_BACKLOG=(offsetof(struct sock, sk_ack_backlog))" in flags
    assert "-DOFF_NET_INUM=(offsetof(struct net, ns.inum))" in flags
    assert not any(flag.startswith("-DREASON_LISTEN_OVERFLOW") for flag in flags)  # 6.1 has no such reason
    assert flags[-2:] == ["-DFENTRY_CONN_REQUEST", "-DFENTRY_SYN_RECV_SOCK"]  # sorted: a stable cache key


def test_compile_flags_fail_loudly_on_a_btf_missing_a_member() -> None:
    with pytest.raises(BtfError):
        compile_flags(Btf(sample_btf()), KERNEL_6_18, set())


def test_source_text_includes_headers_only_without_btf(btf: Btf) -> None:
    with_btf, without = ebpf.source_text(btf), ebpf.source_text(None)
    assert "#include <net/sock.h>" not in with_btf
    assert without.startswith("".join(f"#include <{h}>\n" for h in ebpf.HEADER_INCLUDES))
    assert without.endswith(with_btf)


# --- mode text ------------------------------------------------------------------------------------------


def test_describe_mode() -> None:
    attached = {"sock:sk_data_ready": ProbeState.by(How.RAW_TRACEPOINT), "tcp_conn_request": ProbeState.by(How.KPROBE)}
    assert describe_mode(attached, True) == "full; queue wait covers accept()/accept4(), not io_uring accepts"
    degraded = {**attached, "tcp_conn_request": ProbeState.failed("fentry refused (EPERM)"),
                "skb:kfree_skb": ProbeState.failed("boom")}
    assert describe_mode(degraded, False) == (
        "partial: skb:kfree_skb, tcp_conn_request not observed; SYN-stage drops are counted only from the sweep "
        "(socket drops, ListenOverflows); queue wait covers accept()/accept4(), not io_uring accepts")


# --- trace lines ----------------------------------------------------------------------------------------


def an_event(**changes: Any) -> Event:
    fields: dict[str, Any] = dict(ts_ns=0, kind="ack-overflow", netns=4026532315, inode=1, family=socket.AF_INET,
                                  local="127.0.0.1", port=8080, peer="127.0.0.2", peer_port=51234, queue=5,
                                  backlog=4, value=0, pid=777, comm="aqt-listen")
    fields.update(changes)
    return Event(**fields)


def names_for(known: dict[int, str]) -> NamespaceNames:
    names = NamespaceNames()
    names.names = dict(known)  # pre-filled: a known inode is never looked up on the host
    return names


@pytest.mark.parametrize(("changes", "text"), [
    ({"kind": "accept", "value": 300_449_000}, "waited 300.4 ms in the queue (pid 777 aqt-listen)"),
    ({"kind": "listen", "value": 1024, "backlog": 64}, "listen(backlog=1024) -> effective 64 (pid 777 aqt-listen)"),
    ({"kind": "ack-overflow"}, "handshake ACK dropped: queue full"),
    ({"kind": "syn-overflow"}, "SYN dropped: queue full"),
    ({"kind": "synack-retrans"}, "SYN-ACK resent: handshake not completed"),
    ({"kind": "enqueue"}, ""),
])
def test_detail(changes: dict[str, Any], text: str) -> None:
    assert detail(an_event(**changes)) == text


def test_format_event_fixed_columns() -> None:
    wall = time.mktime((2026, 11, 23, 18, 39, 58, 0, 0, -1)) + 0.8785
    ts_ns = int((wall - trace_module._WALL_MINUS_MONOTONIC) * 1e9)
    names = names_for({4026532315: "aqt-web"})
    line = format_event(an_event(ts_ns=ts_ns), names)
    assert line.split() == ["18:39:58.878", "ack-overflow", "aqt-web", "127.0.0.1:8080", "5/4", "127.0.0.2:51234",
                            "handshake", "ACK", "dropped:", "queue", "full"]
    for title, value in (("EVENT", "ack-overflow"), ("NETNS", "aqt-web"), ("LISTENER", "127.0.0.1:8080")):
        assert line.index(value) == HEADER.index(title), title
    v6 = format_event(an_event(ts_ns=ts_ns, family=socket.AF_INET6, local="::1", peer=None, kind="enqueue",
                               netns=99), names_for({99: "99"}))
    assert v6.split()[2:6] == ["99", "[::1]:8080", "5/4", "-"]


def test_trace_header_titles_sit_over_their_columns() -> None:
    ts_ns = 0
    line = format_event(an_event(ts_ns=ts_ns), names_for({4026532315: "aqt-web"}))
    assert line.index("127.0.0.2:51234") == HEADER.index("PEER")
    assert line.index("handshake") == HEADER.index("DETAIL")
    assert line.index("5/4") + len("5/4") == HEADER.index("QUEUE/BACKLOG") + len("QUEUE/BACKLOG")


def test_namespace_names_relist_on_an_unknown_inode(monkeypatch: pytest.MonkeyPatch) -> None:
    from aqtune.collect import netns

    listings = []

    def listing() -> list[netns.NamespaceRef]:
        listings.append(1)
        return [netns.NamespaceRef("web", 5, "/run/netns/web")]

    monkeypatch.setattr(netns, "list_namespaces", listing)
    names = NamespaceNames()
    assert (names(5), names(5), names(6)) == ("web", "web", "6")
    assert len(listings) == 2  # once for 5, once more for the unknown 6


class FakeLayer:
    """What trace() uses of an EventLayer; each poll delivers the queued events, then asks to stop."""

    def __init__(self, events: list[Event]) -> None:
        self.mode = "partial: tcp_conn_request not observed"
        self.probes = {"sock:sk_data_ready": ProbeState.by(How.RAW_TRACEPOINT),
                       "tcp_conn_request": ProbeState.failed("fentry refused")}
        self.lost = 2
        self.syn_overflow_seen = False
        self.events = events
        self.handlers: list[Any] = []

    def on_event(self, handler: Any) -> None:
        self.handlers.append(handler)

    def poll(self, timeout_ms: int) -> None:
        for event in self.events:
            for handler in self.handlers:
                handler(event)
        self.events = []
        os.kill(os.getpid(), signal.SIGINT)


def run_trace(layer: FakeLayer, port: int | None, **options: Any) -> list[str]:
    """trace() over the fake layer's events: the lines it printed."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    out: list[str] = []

    class Out:
        def write(self, text: str) -> None:
            out.append(text)

        def flush(self) -> None:
            pass

    try:
        assert trace_module.trace(layer, "all", port, out=Out(), **options) == 0  # type: ignore[arg-type]
    finally:
        for signum, handler in saved.items():  # trace() installs its own; pytest's must come back
            signal.signal(signum, handler)
    return "".join(out).splitlines()


def test_trace_filters_by_port_and_reports_degradation(capsys: pytest.CaptureFixture[str]) -> None:
    layer = FakeLayer([an_event(port=8080), an_event(port=9090), an_event(port=8080, kind="enqueue")])
    lines = run_trace(layer, 8080)
    assert lines[0] == HEADER
    assert [line.split()[1] for line in lines[1:]] == ["ack-overflow", "enqueue"]
    assert all(":8080" in line for line in lines[1:])
    err = capsys.readouterr().err
    assert "aqtune trace: partial: tcp_conn_request not observed" in err
    assert "  tcp_conn_request: not attached: fentry refused" in err
    assert "sock:sk_data_ready" not in err  # attached probes are not listed
    assert "2 events lost" in err


def test_trace_filters_by_kind() -> None:
    layer = FakeLayer([an_event(kind="enqueue"), an_event(kind="accept"), an_event(kind="ack-overflow"),
                       an_event(kind="accept", port=9090)])
    lines = run_trace(layer, None, kinds={"accept"})
    assert [line.split()[1] for line in lines[1:]] == ["accept", "accept"]


def test_trace_escapes_untrusted_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process name or namespace name is anyone's choice: control characters reach the terminal escaped."""
    from aqtune.collect import netns

    monkeypatch.setattr(netns, "list_namespaces", lambda: [netns.NamespaceRef("evil\x1b]0;owned\x07", 7, "/x")])
    line = format_event(an_event(kind="accept", netns=7, comm="a\x1b[2J\nb\\"), NamespaceNames())
    assert "\x1b" not in line and "\n" not in line and "\x07" not in line
    assert "evil\\x1b]0;owned\\a" in line
    assert line.endswith("(pid 777 a\\x1b[2J\\nb\\\\)")


@pytest.mark.parametrize(("values", "kinds"), [
    (None, set(KINDS)),
    (["accept"], {"accept"}),
    (["accept,enqueue", " listen "], {"accept", "enqueue", "listen"}),
])
def test_parse_kinds(values: list[str] | None, kinds: set[str]) -> None:
    assert parse_kinds(values) == kinds


def test_parse_kinds_names_the_unknown_and_the_known() -> None:
    with pytest.raises(ValueError, match=r"unknown event kind\(s\) drop, x: choose from enqueue, ack-overflow"):
        parse_kinds(["x,drop"])


def test_emit_for_asks_the_kernel_only_for_what_is_shown() -> None:
    assert emit_for({"ack-overflow"}) == emit_for({"ack-overflow", "syn-overflow"}) == EMIT_DROPS
    assert emit_for({"ack-overflow", "accept"}) == emit_for(KINDS) == EMIT_ALL


def test_trace_help_lists_every_kind(capsys: pytest.CaptureFixture[str]) -> None:
    from aqtune.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["trace", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(kind in help_text for kind in KINDS), help_text


# --- trace --summary ------------------------------------------------------------------------------------

SECOND = 1_000_000_000


def summary_rows(summary: Summary, now_ns: int) -> list[list[str]]:
    return [line.split() for line in summary.due(now_ns)]


def test_summary_counts_each_kind_per_listener_and_second() -> None:
    summary = Summary(names_for({4026532315: "aqt-web"}), KINDS)
    base = 1000 * SECOND
    for n in range(200):  # 200 arrivals and accepts in the first second, waits 1..200 ms
        summary.add(an_event(kind="enqueue", ts_ns=base + n * 1000, queue=n % 7 + 1, inode=1))
        summary.add(an_event(kind="accept", ts_ns=base + n * 1000 + 1, value=(n + 1) * 1_000_000, queue=0, inode=1))
    for _ in range(3):
        summary.add(an_event(kind="ack-overflow", ts_ns=base + 5, queue=5, inode=1))
    summary.add(an_event(kind="listen", ts_ns=base + 9, value=4, queue=0, inode=2, port=9090))
    summary.add(an_event(kind="enqueue", ts_ns=base + SECOND + 1, inode=1))  # the next second
    assert summary.due(base + SECOND) == []  # late events for the first second may still come
    rows = summary_rows(summary, base + SECOND + trace_module.SUMMARY_LATENESS_NS)
    # Worst first: the listener with drops, then the quiet one; the second second is not over yet.
    assert [row[1:] for row in rows] == [
        ["aqt-web", "127.0.0.1:8080", "200", "200", "3", "0", "0", "0", "3", "7/4", "198.0", "ms"],
        ["aqt-web", "127.0.0.1:9090", "0", "0", "0", "0", "0", "1", "0", "0/4", "-"]]
    assert rows[0][0] == time.strftime("%H:%M:%S", time.localtime(base / 1e9 + trace_module._WALL_MINUS_MONOTONIC))
    assert summary_rows(summary, base + 3 * SECOND)[0][2:4] == ["127.0.0.1:8080", "1"]
    assert summary.rest() == []


def test_summary_dashes_what_is_not_asked_for_or_not_observable() -> None:
    summary = Summary(names_for({4026532315: "aqt-web"}), {"accept", "syn-overflow"}, unobserved={"syn-overflow"})
    summary.add(an_event(kind="accept", ts_ns=SECOND, value=2_500_000))
    (row,) = [line.split() for line in summary.rest()]
    assert row[3:12] == ["-", "1", "-", "-", "-", "-", "-", "5/4", "2.5"]


def test_summary_columns_sit_under_their_titles() -> None:
    summary = Summary(names_for({4026532315: "aqt-web"}), KINDS)
    summary.add(an_event(kind="accept", ts_ns=SECOND, value=12_345_678_000))
    (line,) = summary.rest()
    for title, value in (("ACCEPT", " 1 "), ("PEAK/BACKLOG", "5/4"), ("WAIT-P99", "12345.7 ms")):
        assert line.index(value) + len(value) == SUMMARY_HEADER.index(title) + len(title) + (value == " 1 "), title


def test_trace_summary_prints_lines_not_events() -> None:
    ts = time.monotonic_ns() - 5 * SECOND  # long over: due at the first poll
    layer = FakeLayer([an_event(kind="accept", ts_ns=ts + n, value=n * 1000) for n in range(7500)])
    lines = run_trace(layer, None, summary=True)
    assert lines[0] == SUMMARY_HEADER
    assert len(lines) == 2 and lines[1].split()[4] == "7500"


@pytest.mark.parametrize(("values", "fraction", "expected"), [
    ([5], 0.99, 5), ([1, 2, 3, 4], 0.5, 2), (list(range(1, 101)), 0.99, 99), (list(range(100, 0, -1)), 1.0, 100)])
def test_nearest_rank(values: list[int], fraction: float, expected: int) -> None:
    assert nearest_rank(values, fraction) == expected


def test_btf_module_constants_match_the_format() -> None:
    # The reader's per-kind body sizes, from Documentation/bpf/btf.rst; a wrong one derails every later type.
    assert btf_module._FIXED == {btf_module.INT: 4, btf_module.ARRAY: 12, btf_module.VAR: 4, btf_module.DECL_TAG: 4}
    assert btf_module._PER_ENTRY == {btf_module.STRUCT: 12, btf_module.UNION: 12, btf_module.ENUM: 8,
                                     btf_module.FUNC_PROTO: 8, btf_module.DATASEC: 12, btf_module.ENUM64: 12}


def test_without_registers_the_entry_tracepoint_keeps_the_arguments() -> None:
    accept = CAPABILITIES["accept"][0]
    bpf = FakeBpf()
    kept = replace(KERNEL_6_18, task_pt_regs=False)
    assert ebpf._attach(bpf, accept, "syscalls:sys_exit_accept4", kept, {}) == ProbeState.by(
        How.TRACEPOINT, "arguments kept by syscalls:sys_enter_accept4")
    assert ebpf._attach(bpf, accept, "syscalls:sys_exit_accept", KERNEL_6_18, {}) == ProbeState.by(How.TRACEPOINT)
    assert bpf.calls == [("tp", "syscalls:sys_enter_accept4", "on_syscall_enter"),
                         ("tp", "syscalls:sys_exit_accept4", "on_accept_exit"),
                         ("tp", "syscalls:sys_exit_accept", "on_accept_exit")]

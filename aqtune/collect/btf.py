"""Struct member offsets and enum values from the running kernel's BTF (/sys/kernel/btf/vmlinux).

bcc compiles against whatever headers are installed, which need not match the running kernel (here
6.1 headers against a 6.18 kernel: ``sock.sk_ack_backlog`` is at 552 in the headers, 600 in truth).
So the eBPF programs never dereference kernel structs through header types: they read at offsets
from this reader, passed in as constants. One pass over the blob indexes named structs, unions and
enums; lookups descend into anonymous members (``struct_group``, unnamed unions).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

VMLINUX = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F
(INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR,
 DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64) = range(1, 20)
# Bytes that follow the 12-byte type header: a fixed part, and a part per vlen entry.
_FIXED = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_PER_ENTRY = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
_QUALIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}
HEADER = struct.Struct("<HBBIIIII")
TYPE = struct.Struct("<III")


class BtfError(Exception):
    pass


class Btf:
    def __init__(self, data: bytes) -> None:
        if len(data) < HEADER.size:
            raise BtfError("BTF blob too short")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, _str_len = HEADER.unpack_from(data)
        if magic != BTF_MAGIC:
            raise BtfError(f"not BTF (magic {magic:#x})")
        self.data = data
        self.strings = hdr_len + str_off
        self.offsets = [0]  # type id -> position of its header; id 0 is void
        self.named: dict[tuple[str, str], int] = {}
        position, end = hdr_len + type_off, hdr_len + type_off + type_len
        while position < end:
            name_off, info, _size = TYPE.unpack_from(data, position)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            self.offsets.append(position)
            if name_off and kind in (STRUCT, UNION, ENUM, ENUM64):
                key = ("struct" if kind in (STRUCT, UNION) else "enum", self._string(name_off))
                self.named.setdefault(key, len(self.offsets) - 1)
            position += TYPE.size + _FIXED.get(kind, 0) + _PER_ENTRY.get(kind, 0) * vlen

    @classmethod
    def load(cls, path: str = VMLINUX) -> Btf:
        try:
            with open(path, "rb") as f:
                return cls(f.read())
        except OSError as exc:
            raise BtfError(f"{path}: {exc.strerror}") from None

    def _string(self, offset: int) -> str:
        start = self.strings + offset
        return self.data[start:self.data.index(b"\0", start)].decode()

    def _type(self, type_id: int) -> tuple[int, int, int, int, bool, int]:
        position = self.offsets[type_id]
        name_off, info, size_or_type = TYPE.unpack_from(self.data, position)
        return position, name_off, (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31), size_or_type

    def _strip(self, type_id: int) -> int:
        """Follow typedefs and qualifiers to the underlying type."""
        while True:
            _, _, kind, _, _, target = self._type(type_id)
            if kind not in _QUALIFIERS:
                return type_id
            type_id = target

    def _members(self, type_id: int) -> Iterator[tuple[str, int, int, int]]:
        """(name, type id, bit offset, bitfield size or 0) of each member."""
        position, _, kind, vlen, bitfields, _ = self._type(type_id)
        if kind not in (STRUCT, UNION):
            return
        for i in range(vlen):
            name_off, member_type, offset = TYPE.unpack_from(self.data, position + TYPE.size + TYPE.size * i)
            bits, size = (offset & 0xFFFFFF, offset >> 24) if bitfields else (offset, 0)
            yield (self._string(name_off) if name_off else ""), member_type, bits, size

    def _member(self, type_id: int, name: str) -> tuple[int, int, int] | None:
        """(bit offset, type id, bitfield size) of ``name``, looking inside anonymous members too."""
        for member, member_type, bits, size in self._members(type_id):
            if member == name:
                return bits, member_type, size
            if not member:
                inner = self._member(self._strip(member_type), name)
                if inner is not None:
                    return bits + inner[0], inner[1], inner[2]
        return None

    def offset(self, path: str) -> int:
        """Byte offset of a member path such as ``sock.__sk_common.skc_num`` or ``net.ns.inum``."""
        struct_name, *members = path.split(".")
        type_id = self.named.get(("struct", struct_name))
        if type_id is None:
            raise BtfError(f"{path}: no struct {struct_name} in BTF")
        bits = 0
        for name in members:
            found = self._member(self._strip(type_id), name)
            if found is None:
                raise BtfError(f"{path}: no member {name!r}")
            bits += found[0]
            type_id = found[1]
            if found[2]:
                raise BtfError(f"{path}: a {found[2]}-bit bitfield, not addressable")
        if bits % 8:
            raise BtfError(f"{path}: a bitfield (bit {bits}), not addressable")
        return bits // 8

    def enum_value(self, enum: str, name: str) -> int:
        type_id = self.named.get(("enum", enum))
        if type_id is None:
            raise BtfError(f"no enum {enum} in BTF")
        position, _, kind, vlen, signed, _ = self._type(type_id)
        # kind_flag set means signed values; clear (most kernel enums), unsigned.
        entry = struct.Struct(("<Ii" if signed else "<II") if kind == ENUM else ("<IIi" if signed else "<III"))
        for i in range(vlen):
            name_off, value, *high = entry.unpack_from(self.data, position + TYPE.size + entry.size * i)
            if self._string(name_off) == name:
                return int(value) if not high else (int(high[0]) << 32) | int(value)
        raise BtfError(f"enum {enum} has no {name}")

"""Untrusted text made safe for people to read: C-style escapes, display width, clipping.

Socket names, process names, unit and namespace names and interface names are chosen by any local
user. Printed raw, a name can move the cursor, erase rows, set a terminal's title (ESC, CSI, OSC),
ring the bell, break a line, or reorder what follows it (Unicode bidi overrides and isolates). Every
string a person reads goes through one of these functions at the sink; JSON needs none of it
(``json.dumps`` already writes ASCII escapes).

What is escaped: every character ``str.isprintable()`` rejects, that is the C0 and C1 controls and
DEL (category Cc), format characters (Cf: the bidi embeddings, overrides and isolates U+202A-202E
and U+2066-2069, LRM/RLM, zero-width characters, soft hyphen, BOM, tag characters), the line and
paragraph separators U+2028/U+2029 (Zl, Zp), spaces other than U+0020 (Zs: no invisible look-alike
of a space), lone surrogates (Cs), private-use (Co) and unassigned (Cn) code points. Printable
Unicode (letters, marks, symbols of any script) is kept. The forms, as systemd's ``cescape`` and
Python's own literals write them:

- ``\\a \\b \\t \\n \\v \\f \\r`` for those seven controls;
- ``\\xNN`` for the other characters below U+0080 (the rest of C0, and DEL);
- ``\\uNNNN`` for code points U+0080-U+FFFF, C1 controls included (a code point, not its UTF-8
  bytes: the text was already decoded, and ``\\u0085`` says what it is where ``\\xc2\\x85`` would not);
- ``\\UNNNNNNNN`` above U+FFFF.

Two flavours, because two kinds of text reach a terminal:

- ``cescape`` also doubles backslashes, so the escaped form is unambiguous: a name that holds a
  real ESC shows as ``\\x1b``, one that holds the four characters backslash, x, 1, b as
  ``\\\\x1b``. For values: addresses, comm, units, namespace names, whole advice lines.
- ``printable`` leaves backslashes alone, which makes it idempotent (``printable(printable(s)) ==
  printable(s)``, and ``printable(cescape(s)) == cescape(s)``): for composed lines that may
  already carry escapes or ``repr()``s, such as policy problems, and for sinks whose producer may
  or may not have escaped already (the sd_notify STATUS line).

Both have a fast path: a string that needs nothing (the common case, checked in C by
``str.isprintable``) is returned as it is.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from functools import lru_cache

ELLIPSIS = "..."  # marks a cut; ASCII so that it survives any terminal encoding

_NAMED = {"\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f", "\r": "\\r"}


@lru_cache(maxsize=4096)
def _escape_char(char: str) -> str:
    """The escape of one character that ``str.isprintable`` rejects."""
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x80:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _cescape_char(char: str) -> str:
    if char == "\\":
        return "\\\\"
    return char if char.isprintable() else _escape_char(char)


def _printable_char(char: str) -> str:
    return char if char.isprintable() else _escape_char(char)


def cescape(text: str, limit: int | None = None) -> str:
    """``text`` with backslashes doubled and every non-printable character escaped.

    With ``limit``, the result is at most ``limit`` characters: cut between two escapes (never
    inside one) and ended with ``...`` when anything was cut.
    """
    if text.isprintable() and "\\" not in text:
        return text if limit is None else clip(text, limit)
    if limit is None:
        return "".join(map(_cescape_char, text))
    return _join_clipped(map(_cescape_char, text), limit)


def printable(text: str, limit: int | None = None) -> str:
    """``text`` with every non-printable character escaped and backslashes left as they are
    (idempotent). ``limit`` as for ``cescape``."""
    if text.isprintable():
        return text if limit is None else clip(text, limit)
    if limit is None:
        return "".join(map(_printable_char, text))
    return _join_clipped(map(_printable_char, text), limit)


def _join_clipped(pieces: Iterable[str], limit: int) -> str:
    kept: list[str] = []
    length = 0
    room = max(limit - len(ELLIPSIS), 0)
    cut_at: int | None = None  # pieces that fit before the ellipsis, once the text is known to be cut
    for piece in pieces:
        length += len(piece)
        if cut_at is None and length > room:
            cut_at = len(kept)
        if length > limit:
            return "".join(kept[:cut_at]) + ELLIPSIS[:limit]
        kept.append(piece)
    return "".join(kept)


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters (at a code point, never inside one), ending in
    ``...`` when cut. For text that is already safe (escaped, or aqtune's own)."""
    if len(text) <= limit:
        return text
    room = max(limit - len(ELLIPSIS), 0)
    return text[:room] + ELLIPSIS[:limit - room]


def width(text: str) -> int:
    """Columns ``text`` takes on a terminal: East Asian wide and full-width characters take two,
    combining marks none. For aligning tables; exact for escaped text (no controls left)."""
    if text.isascii():
        return len(text)
    columns = 0
    for char in text:
        if unicodedata.combining(char):
            continue
        columns += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return columns


def ljust(text: str, columns: int) -> str:
    """``str.ljust`` by display width."""
    return text + " " * (columns - width(text))


def rjust(text: str, columns: int) -> str:
    """``str.rjust`` by display width."""
    return " " * (columns - width(text)) + text

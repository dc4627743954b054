"""Untrusted text made safe for a terminal (minimal stand-in: the text helper's module replaces it).

Process names, namespace names and socket paths are chosen by any local user; printed raw, control
characters in them can move the cursor, rewrite earlier lines or set a terminal's title.
"""

from __future__ import annotations

_NAMED = {"\\": "\\\\", "\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f", "\r": "\\r"}


def _escape(char: str) -> str:
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if code < 0x20 or code == 0x7F or 0x80 <= code <= 0x9F:
        return f"\\x{code:02x}"
    return char


def cescape(text: str) -> str:
    """``text`` with backslashes doubled and C0/C1 control characters and DEL written as C escapes
    (``\\n``, ``\\t``, ``\\x1b``), as systemd's cescape does."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(map(_escape, text))

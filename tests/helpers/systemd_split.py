"""How systemd reads an sd_notify datagram, for tests that check what PID 1 acts on.

systemd (v247 and later; measured on bookworm's 252) splits a notification with
``strv_split_newlines()``, that is ``extract_first_word()`` with no flags: '\\n' and '\\r' both
separate assignments, empty ones vanish, and a backslash takes the next character literally (the
backslash itself is dropped). A trailing lone backslash makes the split fail, and systemd then drops
the whole datagram.
"""

from __future__ import annotations

SEPARATORS = "\n\r"


def split_like_systemd(text: str) -> list[str] | None:
    """The assignments systemd sees in ``text``, or None where it would drop the datagram."""
    words: list[str] = []
    word: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            word.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in SEPARATORS:
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(char)
    if escaped:
        return None
    if word:
        words.append("".join(word))
    return words

"""aqtune.text: what reaches a terminal holds no character a terminal acts on, and says what was there."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aqtune.text import ELLIPSIS, cescape, clip, printable, width

# What a local user puts in a socket, process, unit or interface name to act on a terminal.
HOSTILE = {
    "newline": ("@x\nWATCHDOG_USEC=1\nX", "@x\\nWATCHDOG_USEC=1\\nX"),
    "osc title": ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\a"),
    "csi erase": ("a\x1b[2K\x1b[1Ab", "a\\x1b[2K\\x1b[1Ab"),
    "bell": ("\x07", "\\a"),
    "nul and del": ("\x00\x7f", "\\x00\\x7f"),
    "c1 csi": ("\x9b2J", "\\u009b2J"),  # 8-bit CSI, which some terminals honour
    "bidi override": ("evil\u202eexe.txt", "evil\\u202eexe.txt"),
    "bidi isolates": ("\u2066a\u2069\u2067b\u2068", "\\u2066a\\u2069\\u2067b\\u2068"),
    "line separators": ("a\u2028b\u2029c\x85", "a\\u2028b\\u2029c\\u0085"),
    "zero width": ("ng\u200binx", "ng\\u200binx"),
    "tag character": ("\U000e0041", "\\U000e0041"),
    "lone surrogate": ("\udcff", "\\udcff"),
    "carriage return": ("ok\rEVIL", "ok\\rEVIL"),
}


@pytest.mark.parametrize(("raw", "shown"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_characters_are_escaped(raw: str, shown: str) -> None:
    assert cescape(raw) == shown
    assert printable(raw) == shown  # none of these holds a backslash


@pytest.mark.parametrize("text", ["nginx.service", "127.0.0.1:80", "/run/app.sock", "", "façade", "日本語",
                                  "e\u0301", "\U0001f600", "a b"])
def test_printable_text_is_kept_as_it_is(text: str) -> None:
    assert cescape(text) is text
    assert printable(text) is text


def test_backslashes_are_doubled_by_cescape_only() -> None:
    # A name holding the four characters \x1b is not confused with one holding ESC.
    assert cescape("a\\x1b") == "a\\\\x1b"
    assert cescape("a\x1b") == "a\\x1b"
    assert printable("a\\x1b") == "a\\x1b"


def test_c_named_escapes() -> None:
    assert cescape("\a\b\t\n\v\f\r") == "\\a\\b\\t\\n\\v\\f\\r"


def test_other_spaces_are_escaped_so_none_looks_like_a_plain_one() -> None:
    assert cescape("a\u00a0b\u3000c") == "a\\u00a0b\\u3000c"


@given(st.text())
def test_cescape_output_is_printable_and_reversible(text: str) -> None:
    shown = cescape(text)
    assert shown.isprintable()
    # Every escape is a Python string escape: decoding gives the original back, so nothing is lost
    # or made ambiguous.
    assert shown.encode("latin-1", "backslashreplace").decode("unicode_escape") == text
    shown.encode("utf-8")  # never a lone surrogate left


@given(st.text())
def test_printable_is_idempotent_and_leaves_cescape_alone(text: str) -> None:
    once = printable(text)
    assert once.isprintable()
    assert printable(once) == once
    assert printable(cescape(text)) == cescape(text)


@given(st.text(), st.integers(min_value=0, max_value=40))
def test_limit_never_cuts_inside_an_escape(text: str, limit: int) -> None:
    whole = cescape(text)
    cut = cescape(text, limit)
    assert len(cut) <= limit
    if len(whole) <= limit:
        assert cut == whole
    else:
        assert cut.endswith(ELLIPSIS[:limit])
        kept = cut[:len(cut) - len(ELLIPSIS[:limit])]
        assert whole.startswith(kept)
        # What is kept decodes: no escape was split.
        kept.encode("latin-1", "backslashreplace").decode("unicode_escape")


def test_clip() -> None:
    assert clip("abcdef", 6) == "abcdef"
    assert clip("abcdef", 5) == "ab..."
    assert clip("日本語日本語", 4) == "日..."
    assert clip("abcdef", 2) == ".."


def test_width_counts_terminal_columns() -> None:
    assert width("abc") == 3
    assert width("日本") == 4
    assert width("e\u0301") == 1
    assert width(cescape("\x1b[2K")) == len("\\x1b[2K")

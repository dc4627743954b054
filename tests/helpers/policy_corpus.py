"""The bad-policy corpus (tests/policies/bad) and the broken files made at test time, shared by the
parser tests and the `aqtune check` tests so both hold the parser to the same expectations.

Each corpus file starts with ``# expect: KEY[, KEY...]``: the dotted keys of every problem the file
has, or ``-`` for a TOML syntax error. The offending lines end with ``# <-`` so a test can check that
a problem points at the right line rather than merely at some line.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "etc" / "aqtune" / "policy.toml"
BAD_DIR = REPO / "tests" / "policies" / "bad"
SYNTAX = "-"
MARKER = "# <-"

@dataclass(frozen=True, slots=True)
class BadPolicy:
    path: Path
    expected: tuple[str, ...]  # dotted keys, or (SYNTAX,)
    marked_lines: frozenset[int]  # 1-based numbers of the lines ending in MARKER

    @property
    def lines(self) -> list[str]:
        return self.path.read_text(encoding="utf-8").splitlines()


def read_corpus() -> list[BadPolicy]:
    cases = []
    for path in sorted(BAD_DIR.glob("*.toml")):
        lines = path.read_text(encoding="utf-8").splitlines()
        header = re.fullmatch(r"# expect: (.+)", lines[0]) if lines else None
        if header is None:
            raise ValueError(f"{path}: the first line must be '# expect: KEY[, KEY...]'")
        marked = frozenset(number for number, line in enumerate(lines, 1) if line.rstrip().endswith(MARKER))
        if not marked:
            raise ValueError(f"{path}: no line is marked with {MARKER!r}")
        cases.append(BadPolicy(path, tuple(key.strip() for key in header.group(1).split(",")), marked))
    return cases


def corpus_params() -> list[Any]:
    """One pytest param per corpus file, named after it."""
    return [pytest.param(case, id=case.path.stem) for case in read_corpus()]


def last_component(key: str) -> str:
    """The part of a dotted key that appears on its line: `listener[1].port` -> `port`,
    `listener[0]` -> `listener` (its ``[[listener]]`` header)."""
    return re.sub(r"\[\d+\]$", "", key.rsplit(".", 1)[-1])


# --- files that cannot live in the corpus: each writer returns the path and the line of the problem ---

def missing_file(directory: Path) -> tuple[Path, int | None]:
    return directory / "absent.toml", None


def directory_instead(directory: Path) -> tuple[Path, int | None]:
    path = directory / "policy.toml"
    path.mkdir()
    return path, None


def binary_garbage(directory: Path) -> tuple[Path, int | None]:
    # Seeded so a failure reproduces; the explicit NUL makes sure the binary check is what fires.
    path = directory / "policy.toml"
    path.write_bytes(random.Random(4).randbytes(4096) + b"\0")
    return path, None


def not_utf8(directory: Path) -> tuple[Path, int | None]:
    # Latin-1 e-acute on line 3: the kind of file an editor in a legacy locale writes.
    path = directory / "policy.toml"
    path.write_bytes(b'mode = "recommend"\n\n# caf\xe9 listeners\ninterval = 1.0\n')
    return path, 3


SPECIAL_CASES: dict[str, Callable[[Path], tuple[Path, int | None]]] = {
    "missing": missing_file,
    "directory": directory_instead,
    "binary": binary_garbage,
    "not-utf8": not_utf8,
}


def oversized(directory: Path) -> Path:
    """A valid policy padded with comments past read_text's 1 MiB read, then an invalid setting."""
    path = directory / "policy.toml"
    padding = "# " + "x" * 77 + "\n"
    path.write_text('mode = "recommend"\n' + padding * (1 + (1 << 20) // len(padding)) + "interval = 0\n")
    return path



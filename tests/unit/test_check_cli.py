"""`aqtune check` as an operator runs it: one subprocess per policy file, judged by exit status and
stderr alone. Needs no root, so it lives with the unit tests.

The contract: exit 0 and a one-line OK for a valid policy; exit 2 for anything else, with one stderr
line per problem that starts with the file (and line, where known) and names the key; never a traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aqtune.decide.policy import DEFAULT_PATH, PolicyError, Problem, parse
from tests.helpers.policy_corpus import (
    REPO,
    SHIPPED,
    SPECIAL_CASES,
    SYNTAX,
    BadPolicy,
    corpus_params,
    oversized,
)


def check(*args: str) -> subprocess.CompletedProcess[str]:
    # The interpreter running the tests is the one with aqtune's dependencies (Debian's /usr/bin/python3
    # per the Makefile); from the repository root `-m aqtune` runs this checkout, not an installed copy.
    return subprocess.run([sys.executable, "-m", "aqtune", "check", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)


def rejected_lines(result: subprocess.CompletedProcess[str], path: Path | str) -> list[str]:
    """The stderr lines of a rejection, after the checks every rejection must pass."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    lines = result.stderr.splitlines()
    assert lines, "no problem reported on stderr"
    assert all(line.startswith(f"{path}:") for line in lines), result.stderr
    return lines


def location(problem: Problem) -> str:
    return f"{problem.file}:{problem.line}:" if problem.line else f"{problem.file}:"


def test_shipped_policy_is_ok() -> None:
    result = check("--config", str(SHIPPED))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert len(result.stdout.splitlines()) == 1, result.stdout


def test_empty_policy_is_ok(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.touch()
    result = check("--config", str(path))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert len(result.stdout.splitlines()) == 1, result.stdout


# Files that parse without a line for their problem still meet this contract ("line where known").
@pytest.mark.parametrize("case", corpus_params())
def test_bad_policy_gives_one_line_per_problem(case: BadPolicy) -> None:
    lines = rejected_lines(check("--config", str(case.path)), case.path)
    # What the parser finds in-process is what the command must print, one line each.
    with pytest.raises(PolicyError) as caught:
        parse(case.path.read_text(encoding="utf-8"), str(case.path))
    problems = caught.value.problems
    assert len(lines) == len(problems), "\n".join(lines)
    for problem in problems:
        named = f" {problem.key}: " if problem.key else ": "
        assert any(line.startswith(location(problem)) and named in line for line in lines), f"{problem} not in {lines}"
    if case.expected == (SYNTAX,):
        assert "TOML syntax error" in lines[0]
    for key in case.expected:
        assert key == SYNTAX or any(f" {key}: " in line for line in lines), f"{key} not named in {lines}"


@pytest.mark.parametrize("kind", sorted(SPECIAL_CASES))
def test_unreadable_file_gives_one_line(tmp_path: Path, kind: str) -> None:
    path, line = SPECIAL_CASES[kind](tmp_path)
    [reported] = rejected_lines(check("--config", str(path)), path)
    if line is not None:
        assert reported.startswith(f"{path}:{line}:"), reported


def test_setting_past_the_first_mebibyte_is_checked(tmp_path: Path) -> None:
    path = oversized(tmp_path)
    rejected_lines(check("--config", str(path)), path)


@pytest.mark.skipif(Path(DEFAULT_PATH).exists(), reason=f"{DEFAULT_PATH} exists here; only its absence is predictable")
def test_checks_the_default_path_without_config() -> None:
    # A check with no --config must look at the installed file, not fall back to the built-in defaults.
    rejected_lines(check(), DEFAULT_PATH)

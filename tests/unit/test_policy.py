"""The policy parser: the shipped file, the bad-policy corpus, defaults, rule matching and the vetting
that keeps apply mode away from files anyone but root could change. Pure and fast; only the
ownership tests need root."""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aqtune.decide.policy import (
    LISTENER_SCHEMA,
    MATCH_KEYS,
    SCHEMA,
    SYSCTL_CEILING,
    Apply,
    Limits,
    ListenerRule,
    Policy,
    PolicyError,
    Problem,
    Saturation,
    load,
    namespace_allowed,
    parse,
    rule_for,
)
from tests.helpers.policy_corpus import (
    BAD_DIR,
    SHIPPED,
    SPECIAL_CASES,
    SYNTAX,
    BadPolicy,
    corpus_params,
    last_component,
    oversized,
)

WEEK = 86400 * 7

# --- the shipped policy ---


def test_shipped_policy_is_valid_and_spells_out_the_defaults() -> None:
    # The shipped file documents every setting with its default value, so it must equal the built-ins.
    policy = parse(SHIPPED.read_text(encoding="utf-8"), str(SHIPPED))
    assert policy == replace(Policy(), source=str(SHIPPED))
    assert policy.mode == "recommend" and not policy.applies


def test_shipped_listener_example_is_valid() -> None:
    # Operators uncomment the example at the end of the shipped file; it must parse as written.
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()
    example = "\n".join(line.removeprefix("# ") for line in lines[lines.index("# [[listener]]"):])
    assert parse(example, "example").listeners == (ListenerRule(port=8080, ignore=True),)


# --- the bad-policy corpus ---


@pytest.mark.parametrize("case", corpus_params())
def test_bad_policy_names_each_problem_at_its_line(case: BadPolicy) -> None:
    path = str(case.path)
    with pytest.raises(PolicyError) as caught:
        parse(case.path.read_text(encoding="utf-8"), path)
    problems = caught.value.problems
    assert {problem.file for problem in problems} == {path}
    if case.expected == (SYNTAX,):
        [problem] = problems
        assert problem.key == "" and problem.message.startswith("TOML syntax error"), str(problem)
        assert problem.line in case.marked_lines, f"{problem}: expected line {sorted(case.marked_lines)}"
        return
    assert sorted(problem.key for problem in problems) == sorted(case.expected), caught.value
    for problem in problems:
        assert problem.line in case.marked_lines, f"{problem}: expected line {sorted(case.marked_lines)}"
        # Guards the corpus too: a marker on the wrong line of a multi-problem file shows up here.
        assert last_component(problem.key) in case.lines[problem.line - 1], str(problem)


def test_crlf_line_endings_give_the_same_lines() -> None:
    text = (BAD_DIR / "several-problems.toml").read_text(encoding="utf-8")
    problems = {}
    for newline in ("\n", "\r\n"):
        with pytest.raises(PolicyError) as caught:
            parse(text.replace("\n", newline), "p.toml")
        problems[newline] = caught.value.problems
    assert problems["\r\n"] == problems["\n"]


# --- files that are not policy text at all ---


@pytest.mark.parametrize(("kind", "says"), [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("binary", "is binary"),
    ("not-utf8", "is not UTF-8"),
])
def test_unreadable_file_is_one_problem_about_the_file(tmp_path: Path, kind: str, says: str) -> None:
    path, line = SPECIAL_CASES[kind](tmp_path)
    with pytest.raises(PolicyError) as caught:
        load(str(path))
    [problem] = caught.value.problems
    assert (problem.file, problem.line, problem.key) == (str(path), line, "")
    assert says in problem.message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file_is_all_defaults(tmp_path: Path, text: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    assert load(str(path)) == Policy(source=str(path))


def test_setting_past_the_first_mebibyte_is_not_ignored(tmp_path: Path) -> None:
    with pytest.raises(PolicyError):
        load(str(oversized(tmp_path)))


# --- defaults and boundaries ---


def test_defaults() -> None:
    policy = parse("", "empty.toml")
    assert (policy.mode, policy.interval, policy.source) == ("recommend", 1.0, "empty.toml")
    assert policy.saturation == Saturation(fill_ratio=0.9, sustain=10.0, clear_ratio=0.5)
    # somaxconn may grow faster than syn_backlog: its own default step is 4.
    assert policy.somaxconn == Limits(max=65535, min=1024, step=4.0, cooldown=300.0)
    assert policy.syn_backlog == Limits(max=65535, min=1024, step=2.0, cooldown=300.0)
    assert policy.apply == Apply(namespaces=("*",), persist=False)
    assert policy.listeners == ()
    assert policy.apply_refused is None and not policy.applies


def test_partial_table_keeps_the_other_defaults() -> None:
    policy = parse("[somaxconn]\nmax = 4096\n\n[saturation]\nsustain = 0\n")
    assert policy.somaxconn == Limits(max=4096, min=1024, step=4.0, cooldown=300.0)
    assert policy.saturation == Saturation(sustain=0.0)


@pytest.mark.parametrize(("text", "attribute", "value"), [
    ("interval = 3600", "interval", 3600.0),
    ("interval = 0.001", "interval", 0.001),
    ("[saturation]\nfill_ratio = 1\nclear_ratio = 1", "saturation.clear_ratio", 1.0),
    ("[saturation]\nsustain = 0", "saturation.sustain", 0.0),
    (f"[saturation]\nsustain = {WEEK}", "saturation.sustain", float(WEEK)),
    ("[somaxconn]\nstep = 64", "somaxconn.step", 64.0),
    ("[somaxconn]\nstep = 1.01", "somaxconn.step", 1.01),
    ("[somaxconn]\ncooldown = 0", "somaxconn.cooldown", 0.0),
    (f"[syn_backlog]\nmax = {SYSCTL_CEILING}", "syn_backlog.max", SYSCTL_CEILING),
    ("[syn_backlog]\nmin = 1\nmax = 1", "syn_backlog.min", 1),
    ('[apply]\nnamespaces = ["host", "pid:1", "web"]\npersist = true', "apply",
     Apply(namespaces=("host", "pid:1", "web"), persist=True)),
    ("[[listener]]\nport = 0", "listeners", (ListenerRule(port=0),)),
    ("[[listener]]\nport = 65535\nignore = false\nfill_ratio = 1\nsustain = 0", "listeners",
     (ListenerRule(port=65535, fill_ratio=1.0, sustain=0.0),)),
])
def test_inclusive_bounds_are_accepted(text: str, attribute: str, value: object) -> None:
    assert operator.attrgetter(attribute)(parse(text)) == value


# --- problems as the operator reads them ---


def test_problem_reads_file_line_key_message() -> None:
    assert str(Problem("p.toml", 3, "somaxconn.max", "bad")) == "p.toml:3: somaxconn.max: bad"
    assert str(Problem("p.toml", None, "listener", "bad")) == "p.toml: listener: bad"
    assert str(Problem("p.toml", None, "", "no such file")) == "p.toml: no such file"


def test_policy_error_lists_every_problem_one_per_line() -> None:
    with pytest.raises(PolicyError) as caught:
        parse('mode = "aply"\ninterval = 0\n', "p.toml")
    assert str(caught.value).splitlines() == [str(problem) for problem in caught.value.problems]
    assert len(caught.value.problems) == 2


# --- rule matching ---

RULES = parse("""
[[listener]]
port = 8080
process = "nginx"
fill_ratio = 0.5

[[listener]]
port = 8080
ignore = true

[[listener]]
unit = "db.service"
netns = "web"
sustain = 0

[[listener]]
address = "127.0.0.1:9000"
""")


def match(port: int | None = 8080, netns: str = "host", address: str = "0.0.0.0:8080",
          comms: tuple[str, ...] = (), units: tuple[str, ...] = ()) -> ListenerRule | None:
    return rule_for(RULES, netns, address, port, comms, units)


def test_first_matching_rule_wins() -> None:
    assert match(comms=("nginx",)) is RULES.listeners[0]


def test_every_key_a_rule_gives_must_match() -> None:
    # Port 8080 fits rule 0 but the process does not, so rule 1 (port only) takes it.
    assert match(comms=("python3",)) is RULES.listeners[1]
    assert match(port=5432, netns="web", units=("db.service",)) is RULES.listeners[2]
    assert match(port=5432, netns="host", units=("db.service",)) is None
    assert match(port=5432, netns="web", units=("other.service",)) is None


def test_process_and_unit_match_any_owner() -> None:
    # A socket shared by several processes matches when any of them has the name.
    assert match(comms=("python3", "nginx")) is RULES.listeners[0]
    assert match(port=1, netns="web", units=("a.service", "db.service")) is RULES.listeners[2]


def test_address_matches_exactly() -> None:
    assert match(port=9000, address="127.0.0.1:9000") is RULES.listeners[3]
    assert match(port=9000, address="0.0.0.0:9000") is None


def test_unix_listener_without_port_skips_port_rules() -> None:
    assert match(port=None, address="/run/app.sock", comms=("nginx",)) is None


def test_no_rules_match_nothing() -> None:
    assert rule_for(Policy(), "host", "0.0.0.0:80", 80, ("nginx",), ("nginx.service",)) is None


def test_namespace_allowed_by_wildcard_or_name() -> None:
    assert namespace_allowed(Policy(), "host") and namespace_allowed(Policy(), "pid:42")
    named = parse('[apply]\nnamespaces = ["host", "web"]\n')
    assert namespace_allowed(named, "web") and not namespace_allowed(named, "db")
    assert namespace_allowed(parse('[apply]\nnamespaces = ["web", "*"]\n'), "db")


# --- apply mode only from files only root can change ---

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create root-owned files and chown to 65534")


def policy_file(directory: Path, permissions: int, uid: int = 0, text: str = 'mode = "apply"\n') -> str:
    path = directory / "policy.toml"
    path.write_text(text)
    os.chown(path, uid, -1)
    os.chmod(path, permissions)  # explicit, so the umask cannot decide the outcome
    return str(path)


@needs_root
def test_apply_from_root_owned_0644_is_kept(tmp_path: Path) -> None:
    policy = load(policy_file(tmp_path, 0o644))
    assert policy.applies and policy.apply_refused is None


@needs_root
def test_apply_from_file_owned_by_another_uid_is_refused(tmp_path: Path) -> None:
    path = policy_file(tmp_path, 0o644, uid=65534)
    policy = load(path)
    # Downgraded, not rejected: the daemon keeps recommending, and says how to fix the file.
    assert policy.mode == "apply" and not policy.applies
    assert policy.apply_refused is not None
    assert "uid 65534" in policy.apply_refused and f"chown root:root {path}" in policy.apply_refused


@needs_root
@pytest.mark.parametrize("permissions", [0o666, 0o664, 0o646])
def test_apply_from_group_or_other_writable_file_is_refused(tmp_path: Path, permissions: int) -> None:
    policy = load(policy_file(tmp_path, permissions))
    assert not policy.applies
    assert policy.apply_refused is not None and f"mode {permissions:o}" in policy.apply_refused


@needs_root
def test_recommend_mode_from_unsafe_file_needs_no_downgrade(tmp_path: Path) -> None:
    policy = load(policy_file(tmp_path, 0o666, uid=65534, text='mode = "recommend"\n'))
    assert policy.apply_refused is None


# --- properties ---

ratios = st.floats(min_value=0, max_value=1, exclude_min=True)
seconds = st.floats(min_value=0, max_value=WEEK)
sysctl_values = st.integers(min_value=1, max_value=SYSCTL_CEILING)
steps = st.floats(min_value=1, max_value=64, exclude_min=True)
# Control characters and surrogates cannot appear literally in a TOML string; everything else can.
names = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=12)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # Python's float repr (incl. inf, 1e+16) is valid TOML and round-trips
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(value)


def render(top: dict[str, Any], tables: dict[str, dict[str, Any]], rules: list[dict[str, Any]]) -> str:
    lines = [f"{key} = {toml_value(value)}" for key, value in top.items()]
    for name, table in tables.items():
        lines += ["", f"[{name}]", *(f"{key} = {toml_value(value)}" for key, value in table.items())]
    for rule in rules:
        lines += ["", "[[listener]]", *(f"{key} = {toml_value(value)}" for key, value in rule.items())]
    return "\n".join(lines) + "\n"


match_keys = st.fixed_dictionaries({}, optional={"port": st.integers(0, 65535), "address": names, "process": names,
                                                 "unit": names, "netns": names}).filter(bool)
settings_of_rule = st.just({"ignore": True}) | st.fixed_dictionaries(
    {}, optional={"ignore": st.just(False), "fill_ratio": ratios, "sustain": seconds})
valid_rules = st.builds(lambda match, extra: {**match, **extra}, match_keys, settings_of_rule)


@st.composite
def valid_policies(draw: st.DrawFn) -> tuple[str, Policy]:
    """TOML text with in-range values for a random selection of settings, and the Policy it means."""
    top: dict[str, Any] = draw(st.fixed_dictionaries({}, optional={
        "mode": st.sampled_from(["recommend", "apply"]),
        "interval": st.floats(min_value=0, max_value=3600, exclude_min=True) | st.integers(1, 3600)}))
    tables: dict[str, dict[str, Any]] = {}
    if draw(st.booleans()):
        # Whole table at once: with only fill_ratio drawn, the default clear_ratio could exceed it.
        clear, fill = sorted(draw(st.tuples(ratios, ratios)))
        tables["saturation"] = {"fill_ratio": fill, "sustain": draw(seconds), "clear_ratio": clear}
    for name in ("somaxconn", "syn_backlog"):
        if draw(st.booleans()):
            low, high = sorted(draw(st.tuples(sysctl_values, sysctl_values)))
            tables[name] = {"max": high, "min": low, "step": draw(steps), "cooldown": draw(seconds)}
    if draw(st.booleans()):
        tables["apply"] = {"namespaces": draw(st.lists(names, max_size=3)), "persist": draw(st.booleans())}
    rules = draw(st.lists(valid_rules, max_size=3))
    defaults = Policy()
    apply = tables.get("apply", {})
    expected = Policy(
        mode=top.get("mode", defaults.mode), interval=top.get("interval", defaults.interval),
        saturation=Saturation(**tables.get("saturation", {})),
        somaxconn=replace(defaults.somaxconn, **tables.get("somaxconn", {})),
        syn_backlog=replace(defaults.syn_backlog, **tables.get("syn_backlog", {})),
        apply=Apply(namespaces=tuple(apply.get("namespaces", defaults.apply.namespaces)),
                    persist=apply.get("persist", defaults.apply.persist)),
        listeners=tuple(ListenerRule(**rule) for rule in rules), source="gen.toml")
    return render(top, tables, rules), expected


@settings(max_examples=100, deadline=None)
@given(valid_policies())
def test_any_valid_policy_parses_to_exactly_its_values(generated: tuple[str, Policy]) -> None:
    text, expected = generated
    assert parse(text, "gen.toml") == expected


# Values at and beside every documented bound: tried for every setting, as random search rarely hits them.
# NaN is left out: the parser accepts it (cooldown-nan, fill-ratio-nan in the corpus).
EDGES = [-1, 0, 1, 2, 64, 65, 3600, 3601, 65535, 65536, WEEK, WEEK + 1, SYSCTL_CEILING, SYSCTL_CEILING + 1,
         -1e-9, -0.0, 0.0, 1e-9, 0.5, 0.9, 1.0, 1.0000001, 64.0, 64.5, 3600.5, WEEK + 0.5, math.inf, -math.inf,
         True, False, "", "apply", "recommend", "Apply", [], ["host"], ["host", ""], [1]]
scalars = st.one_of(st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False),
                    st.floats(min_value=-0.5, max_value=2), names)
values = scalars | st.lists(scalars, max_size=3)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_ratio(value: Any) -> bool:
    return is_number(value) and 0 < value <= 1


def is_seconds(value: Any) -> bool:
    return is_number(value) and 0 <= value <= WEEK


def is_sysctl(value: Any) -> bool:
    return is_integer(value) and 1 <= value <= SYSCTL_CEILING


def is_text(value: Any) -> bool:
    return isinstance(value, str) and value != ""


# The documented schema, written out independently of the parser's own tables.
SPEC: dict[str, Callable[[Any], bool]] = {
    "mode": lambda value: isinstance(value, str) and value in ("recommend", "apply"),
    "interval": lambda value: is_number(value) and 0 < value <= 3600,
    "saturation.fill_ratio": is_ratio,
    "saturation.sustain": is_seconds,
    "saturation.clear_ratio": is_ratio,
    **{f"{name}.{key}": check for name in ("somaxconn", "syn_backlog") for key, check in (
        ("max", is_sysctl), ("min", is_sysctl), ("step", lambda value: is_number(value) and 1 < value <= 64),
        ("cooldown", is_seconds))},
    "apply.namespaces": lambda value: isinstance(value, list) and all(is_text(name) for name in value),
    "apply.persist": lambda value: isinstance(value, bool),
    "listener.port": lambda value: is_integer(value) and 0 <= value <= 65535,
    **{f"listener.{key}": is_text for key in ("address", "process", "unit", "netns")},
    "listener.ignore": lambda value: isinstance(value, bool),
    "listener.fill_ratio": is_ratio,
    "listener.sustain": is_seconds,
    "limits.sweep_seconds": lambda value: is_number(value) and 0 < value <= 3600,
    "limits.namespaces": lambda value: is_integer(value) and 1 <= value <= 1_000_000,
    **{f"limits.{key}": lambda value: is_integer(value) and 1 <= value <= 10_000_000
       for key in ("listeners", "published_listeners")},
}


def fits_the_defaults(setting: str, value: Any) -> bool:
    """Whether a value valid on its own also keeps clear_ratio <= fill_ratio and min <= max
    against the defaults of the settings it is compared with."""
    defaults = Policy()
    table, _, key = setting.partition(".")
    if setting == "saturation.fill_ratio":
        return bool(value >= defaults.saturation.clear_ratio)
    if setting == "saturation.clear_ratio":
        return bool(value <= defaults.saturation.fill_ratio)
    if table in ("somaxconn", "syn_backlog") and key in ("min", "max"):
        limits = replace(getattr(defaults, table), **{key: value})
        return limits.min <= limits.max
    return True


def one_setting(setting: str, value: Any) -> tuple[str, int]:
    """A policy giving just this setting, and the line it is on."""
    table, _, key = setting.partition(".")
    if not key:
        return f"{table} = {toml_value(value)}\n", 1
    if table == "listener":
        # A rule needs a match key of its own, which must not be the one under test.
        other = "unit" if key == "netns" else "netns"
        return f'[[listener]]\n{other} = "web"\n{key} = {toml_value(value)}\n', 3
    return f"[{table}]\n{key} = {toml_value(value)}\n", 2


def assert_kept_or_named(setting: str, value: Any) -> None:
    """A valid value is stored as given; an invalid one is a problem naming the setting at its line."""
    text, line = one_setting(setting, value)
    given_as = f"{setting} = {value!r}"
    if SPEC[setting](value) and fits_the_defaults(setting, value):
        policy = parse(text)
        stored = policy.listeners[0] if setting.startswith("listener.") else policy
        kept = operator.attrgetter(setting.removeprefix("listener."))(stored)
        assert kept == (tuple(value) if isinstance(value, list) else value), given_as
        return
    try:
        policy = parse(text, "one.toml")
    except PolicyError as error:
        # A value valid on its own but clashing with a default is reported by a cross-check instead.
        if not SPEC[setting](value):
            dotted = setting.replace("listener.", "listener[0].")
            assert any(p.key == dotted and p.line == line for p in error.problems), f"{given_as}: {error}"
    else:
        pytest.fail(f"{given_as} was accepted as {policy}")


@pytest.mark.parametrize("setting", sorted(SPEC))
def test_edge_values_are_kept_or_named_at_their_line(setting: str) -> None:
    for value in EDGES:
        assert_kept_or_named(setting, value)


@pytest.mark.parametrize("setting", sorted(SPEC))
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=values)
def test_any_value_is_kept_or_named_at_its_line(setting: str, value: Any) -> None:
    assert_kept_or_named(setting, value)


TABLES = sorted(name for name, check in SCHEMA.items() if isinstance(check, dict))
TOP_KEYS = sorted(name for name, check in SCHEMA.items() if not isinstance(check, dict))
INNER_KEYS = sorted({key for name in TABLES for key in SCHEMA[name]} | set(LISTENER_SCHEMA))
junk_keys = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)


def any_dict(keys: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(keys, values, max_size=4)


@settings(max_examples=150, deadline=None)
@given(top=any_dict(st.sampled_from([*TOP_KEYS, *INNER_KEYS]) | junk_keys),
       tables=st.dictionaries(st.sampled_from(TABLES) | junk_keys, any_dict(st.sampled_from(INNER_KEYS) | junk_keys),
                              max_size=3),
       rules=st.lists(any_dict(st.sampled_from(INNER_KEYS) | junk_keys), max_size=2))
def test_any_toml_document_gives_a_valid_policy_or_named_problems(
        top: dict[str, Any], tables: dict[str, dict[str, Any]], rules: list[dict[str, Any]]) -> None:
    # Keep the document valid TOML (no key defined twice), so every problem is about the policy itself.
    tables = {name: table for name, table in tables.items() if name not in top and name != "listener"}
    top = {key: value for key, value in top.items() if key != "listener"}
    try:
        policy = parse(render(top, tables, rules), "fuzz.toml")
    except PolicyError as error:
        reported = {problem.key for problem in error.problems}
        assert error.problems and "" not in reported
        unknown = {key for key in top if key not in SCHEMA}
        unknown |= {key for key in tables if key not in SCHEMA}
        unknown |= {f"{name}.{key}" for name, table in tables.items() if isinstance(SCHEMA.get(name), dict)
                    for key in table if key not in SCHEMA[name]}
        unknown |= {f"listener[{index}].{key}" for index, rule in enumerate(rules)
                    for key in rule if key not in LISTENER_SCHEMA}
        assert unknown <= reported
        return
    assert_consistent(policy)


def assert_consistent(policy: Policy) -> None:
    """What the rest of aqtune may rely on once a policy has parsed."""
    assert policy.mode in ("recommend", "apply")
    assert 0 < policy.interval <= 3600
    saturation = policy.saturation
    assert 0 < saturation.clear_ratio <= saturation.fill_ratio <= 1 and 0 <= saturation.sustain <= WEEK
    for limits in (policy.somaxconn, policy.syn_backlog):
        assert isinstance(limits.max, int) and isinstance(limits.min, int)
        assert 1 <= limits.min <= limits.max <= SYSCTL_CEILING
        assert 1 < limits.step <= 64 and 0 <= limits.cooldown <= WEEK
    assert isinstance(policy.apply.persist, bool)
    assert all(isinstance(name, str) and name for name in policy.apply.namespaces)
    for rule in policy.listeners:
        assert any(getattr(rule, key) is not None for key in MATCH_KEYS)
        assert not (rule.ignore and (rule.fill_ratio is not None or rule.sustain is not None))
        assert rule.fill_ratio is None or 0 < rule.fill_ratio <= 1
        assert rule.sustain is None or (math.isfinite(rule.sustain) and 0 <= rule.sustain <= WEEK)

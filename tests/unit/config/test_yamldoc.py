"""Reading one rules file within bounds: YAML 1.2 values, lines, and refusals that are fast."""

from __future__ import annotations

import time

import pytest

from proxy.config.issues import ConfigIssue
from proxy.config.yamldoc import DEFAULT_LIMITS, ReadLimits, parse


def bomb(levels: int = 9) -> str:
    lines = ["a: &a [" + ", ".join(["lol"] * 9) + "]"]
    names = "abcdefghijklmnop"
    for i in range(1, levels):
        lines.append(f"{names[i]}: &{names[i]} [" + ", ".join([f"*{names[i - 1]}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (bomb(), 6, "expands to more than 100,000 values (aliases included); refused"),
        ("x: " + "[" * 10_000 + "]" * 10_000, 1, "nested deeper than 32 levels; refused"),
        ("x: " + "{a: " * 10_000 + "1" + "}" * 10_000, 1, "nested deeper than 32 levels; refused"),
        ("- " * 10_000 + "x\n", 1, "nested deeper than 32 levels; refused"),
        ("x: " + "a" * (300 * 1024), 1, "file is 307,203 bytes; rules files are limited to "
         "131,072 bytes (split the rules into several files)"),
        ("a: 1\nb:\n  c: 2\n  c: 3\n", 4, "duplicate key `c`: first written on line 3"),
        ("a: 1\n---\nb: 2\n", 2, "one YAML document per file: remove the `---` separator"),
        ("? [a, b]\n: 1\n", 1, "a key must be plain text, not a mapping or a list"),
        ("a: &x 1\n*x : 2\n", 2, "an alias cannot be a key; write the key out"),
        ("a: [1, 2\n", 2, "invalid YAML: while parsing a flow sequence expected ',' or ']', "
         "but got '<stream end>'"),
        ("a: *nope\n", 1, "invalid YAML: found undefined alias 'nope'"),
        ("1: x\n", 1, 'key 1 must be text: quote it ("1")'),
    ],
    ids=[
        "alias-bomb", "deep-flow-lists", "deep-flow-maps", "deep-block-lists", "too-big",
        "duplicate-key", "two-documents", "complex-key", "alias-key", "unclosed-list",
        "undefined-alias", "number-key",
    ],
)  # fmt: skip
def test_refusals_name_the_line_and_come_fast(text: str, line: int, message: str) -> None:
    issues: list[ConfigIssue] = []
    start = time.monotonic()
    assert parse("f.yaml", text.encode(), issues, DEFAULT_LIMITS) is None
    assert time.monotonic() - start < 1.0
    assert [(i.line, i.message) for i in issues] == [(line, message)]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("x: [on, off, yes, no, y, n]\n", {"x": ["on", "off", "yes", "no", "y", "n"]}),
        ("x: [true, false, null, ~]\n", {"x": [True, False, None, None]}),
        ("x: [1, 1.5, 0o17, '1']\n", {"x": [1, 1.5, 15, "1"]}),
        ("a: &d {k: 1}\nb: {<<: *d, j: 2}\n", {"a": {"k": 1}, "b": {"j": 2, "k": 1}}),
        # YAML allows an anchor to be defined again: an alias means the latest, no warning.
        ("a: &x 1\nb: &x [2, 3]\nc: *x\n", {"a": 1, "b": [2, 3], "c": [2, 3]}),
        ("", None),
    ],
    ids=[
        "yaml-1.1-booleans-are-text",
        "booleans-and-null",
        "numbers",
        "merge-key",
        "anchor-defined-again",
        "empty",
    ],
)
def test_values_are_plain_yaml_12(text: str, value: object) -> None:
    issues: list[ConfigIssue] = []
    parsed = parse("f.yaml", text.encode(), issues, DEFAULT_LIMITS)
    assert issues == [] and parsed is not None
    assert parsed.value == value
    assert type(parsed.value) in (dict, type(None))


@pytest.mark.parametrize(
    ("pointer", "line"),
    [
        ([], 1),
        (["routes"], 2),
        (["routes", 0], 3),
        (["routes", 0, "timeouts"], 5),
        (["routes", 0, "timeouts", "per_try"], 6),
        (["routes", 1, "name"], 7),
        (["routes", 0, "nope", "deeper"], 3),
    ],
    ids=["root", "key", "item", "nested-key", "flow-key", "second-item", "missing-stops"],
)
def test_lines_name_the_key_of_a_pointer(pointer: list[object], line: int) -> None:
    text = (
        "# comment\n"
        "routes:\n"
        "  - name: a\n"
        "    gateways: [g]\n"
        "    timeouts:\n"
        "      per_try: 2s\n"
        "  - name: b\n"
    )
    parsed = parse("f.yaml", text.encode(), [], DEFAULT_LIMITS)
    assert parsed is not None
    assert parsed.lines.line(pointer) == line


def test_time_limit_refuses_a_slow_read() -> None:
    issues: list[ConfigIssue] = []
    text = "x: [" + ", ".join(["1"] * 20_000) + "]\n"
    limits = ReadLimits(max_seconds=0.0, max_nodes=1_000_000)
    assert parse("f.yaml", text.encode(), issues, limits) is None
    assert [i.message for i in issues] == ["took longer than 0s to read; refused"]

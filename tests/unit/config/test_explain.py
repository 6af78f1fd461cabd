"""Schema failures worded for people: forms with examples, the closest key, no secrets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from proxy.config.explain import Explainer, show
from proxy.config.issues import Doc

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "timeouts": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"per_try": {"$ref": "#/$defs/duration"}},
        },
        "retry": {"type": "object"},
        "cache": {
            "oneOf": [
                {"type": "boolean"},
                {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"ttl": {"$ref": "#/$defs/duration"}},
                },
            ]
        },
        "mode": {"enum": ["never", "same-provider"]},
    },
    "$defs": {"duration": {"type": "string", "pattern": "^\\d+(ms|s)$"}},
}
FORM = "a duration like 250ms, 2s, 1m, 24h (one number, one unit: ms, s, m, h, d)"


class NoLines:
    def line(self, parts: Any) -> int:
        return len(parts)


@pytest.mark.parametrize(
    ("instance", "expected"),
    [
        ({"timeout": {}}, [("/timeout", "unknown key `timeout`; did you mean `timeouts`?")]),
        (
            {"per_try": "2s"},
            [("/per_try", "unknown key `per_try`: it belongs inside `timeouts` (check its indentation)")],
        ),
        ({"zzz": 1}, [("/zzz", "unknown key `zzz`; known keys here: cache, mode, retry, timeouts")]),
        ({"timeouts": {"per_try": 500}}, [("/timeouts/per_try", f"`500` needs a unit: write {FORM}")]),
        ({"cache": {"ttl": "1d12h"}}, [("/cache/ttl", f"`1d12h` is not {FORM}")]),
        ({"cache": "x"}, [("/cache", "expected true or false, or a mapping (key: value), got `x`")]),
        (
            {"mode": "same_provider"},
            [("/mode", "`same_provider` is not one of `never`, `same-provider`; did you mean `same-provider`?")],
        ),
        ({"timeouts": []}, [("/timeouts", "expected a mapping (key: value), got a list")]),
    ],
    ids=[
        "typo", "mis-indented", "unknown", "no-unit", "one-of-branch-meant", "one-of-no-branch",
        "enum", "type",
    ],
)  # fmt: skip
def test_explained(instance: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    explainer = Explainer(SCHEMA)
    doc = Doc("f.yaml", instance, NoLines())
    validator = jsonschema.Draft202012Validator(SCHEMA)
    got = [
        (i.pointer, i.message)
        for err in validator.iter_errors(instance)
        for i in explainer.issues(doc, err)
    ]
    assert got == expected


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("http://user:hunter2@host/x", "`http://…@host/x`"),
        ("x" * 100, "`" + "x" * 59 + "…`"),
        (None, "an empty value"),
        (True, "`true`"),
        ({"a": 1}, "a mapping"),
    ],
    ids=["userinfo-hidden", "cut", "none", "bool", "mapping"],
)
def test_show(value: object, shown: str) -> None:
    assert show(value) == shown


_PROBE = """
import sys
from pathlib import Path
from proxy.config.load import ConfigError, build_rules, read_sources
build_rules(read_sources(sorted(Path("rules").glob("*.yaml"))))
good = "difflib" in sys.modules
try:
    build_rules([("bad.yaml", b"routes:\\n  - nmae: x\\n")])
except ConfigError:
    pass
print(good, "difflib" in sys.modules)
"""


def test_good_rules_leave_difflib_unloaded_and_refused_ones_load_it() -> None:
    # A sidecar that loaded good rules does not carry difflib (0.2 MiB of its idle RSS).
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=Path(__file__).resolve().parents[3],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "False True", out.stdout + out.stderr

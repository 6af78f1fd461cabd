"""Fuzzing the rules loader: whatever the bytes, it returns rules or raises ConfigError.

Three sources of input: token soup made of YAML's own syntax, JSON-like documents with the
rules' own keys (JSON is YAML), and random edits of the example rules. Any other exception,
or a single load slower than the deadline, fails. Bounded to well under 30 s in all.
"""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.config.load import ConfigError, build_rules
from proxy.config.model import Rules

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = {p.name: p.read_text() for p in sorted((REPO / "rules").glob("*.yaml"))}

FUZZ = settings(
    max_examples=150,
    deadline=2000,  # ms per load: a hang or a blow-up shows as a deadline failure
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TOKENS = [
    "gateways:", "routes:", "transaction_headers:", "\n", "  ", "    ", "- ", ": ", ":",
    "&a ", "*a", "&b ", "*b", "<<: ", "[", "]", "{", "}", ", ", "'", '"', "!!str ",
    "!!python/object:os.system ", "? ", "---\n", "...\n", "# c\n", "|\n", ">-\n", "%YAML 1.2\n",
    "\t", "on", "yes", "~", "null", "1e3", "0x1F", "-.inf", "2026-01-01", "\\u0000", "\ufeff",
    "name", "url", "http://u:p@h:1", "region", "eu", "match", "path_prefix", "/v1",
    "timeouts", "per_try", "500", "1d12h", "max_body", "999999999999GiB", "headers",
    "value_from", "file", "env", "stripe-eu", "weight", "-1", "retry", "attempts",
]  # fmt: skip

KEYS = [
    "gateways", "routes", "name", "url", "region", "match", "path", "path_prefix", "methods",
    "gateways", "timeouts", "per_try", "total", "retry", "on", "idempotency", "ttl",
    "max_body", "headers", "value", "value_from", "file", "env", "limits", "rate", "burst",
    "health_check", "outlier", "degradation", "default", "fallback", "countries", "weight",
]  # fmt: skip


def accepts(files: dict[str, bytes]) -> None:
    try:
        rules = build_rules(sorted(files.items()))
    except ConfigError as exc:
        assert exc.issues
        for issue in exc.issues:
            assert len(issue.message) <= 500
        return
    assert isinstance(rules, Rules)


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=80).map("".join))
@example("&a <<: &a ")  # found here once: ruamel warned of the anchor defined again
def test_yaml_token_soup(text: str) -> None:
    accepts({"a.yaml": text.encode("utf-8", "surrogatepass")})


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["eu", "stripe-eu", "2s", "/v1", "http://127.0.0.1:1", "POST"]),
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5),
    ),
    max_leaves=40,
)


@FUZZ
@given(st.dictionaries(st.sampled_from(["gateways", "routes", "x"]), documents, max_size=3))
def test_json_like_documents(doc: dict[str, object]) -> None:
    accepts({"a.yaml": json.dumps(doc).encode(), **{"b.yaml": EXAMPLES["routes.yaml"].encode()}})


edits = st.lists(
    st.tuples(
        st.sampled_from(["delete", "insert", "duplicate-line", "indent", "dedent"]),
        st.integers(min_value=0, max_value=10_000),
        st.integers(min_value=1, max_value=40),
        st.sampled_from(TOKENS),
    ),
    min_size=1,
    max_size=6,
)


def mutate(text: str, ops: list[tuple[str, int, int, str]]) -> str:
    for op, at, length, token in ops:
        at %= max(len(text), 1)
        if op == "delete":
            text = text[:at] + text[at + length :]
        elif op == "insert":
            text = text[:at] + token + text[at:]
        else:
            lines = text.split("\n")
            i = at % len(lines)
            if op == "duplicate-line":
                lines.insert(i, lines[i])
            elif op == "indent":
                lines[i] = "  " + lines[i]
            else:
                lines[i] = lines[i][2:]
            text = "\n".join(lines)
    return text


@FUZZ
@given(st.sampled_from(sorted(EXAMPLES)), edits)
def test_edits_of_the_example_rules(name: str, ops: list[tuple[str, int, int, str]]) -> None:
    files = {n: t.encode() for n, t in EXAMPLES.items()}
    files[name] = mutate(EXAMPLES[name], ops).encode()
    accepts(files)

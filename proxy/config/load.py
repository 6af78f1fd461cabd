"""Turns a rules directory (or files) into one validated, immutable `Rules` snapshot.

Owns: reading the files (a ConfigMap's from one version), YAML with line numbers, the JSON
Schema check (one validator, built once), and the pipeline YAML -> schema -> semantic checks
(`proxy.config.build`) -> frozen model. Every problem becomes a `ConfigIssue` naming file,
line and JSON pointer; `load_rules` raises `ConfigError` carrying all of them.
Must not: publish anything or touch runtime state; the store decides what to do with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

import jsonschema
import yaml

from proxy.config import model
from proxy.config.build import Builder
from proxy.config.issues import ConfigError, ConfigIssue, Doc, Lines

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "build_rules",
    "content_hash",
    "load_rules",
    "read_sources",
    "rule_files",
]

RULE_SUFFIXES = (".yaml", ".yml")
SCHEMA_ENV = "PAYSWITCH_SCHEMAS"


def schema_dir() -> Path:
    env = os.environ.get(SCHEMA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "schemas"


@cache
def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads((schema_dir() / "rules.schema.json").read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator: jsonschema.protocols.Validator = cls(schema)
    return validator


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: `on`, `off`, `yes`, `no` stay strings.

    `retry: {on: [...]}` must not turn into `{True: [...]}`.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def rule_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The rules files named by `paths`: files as given, directories' *.yaml/*.yml sorted.

    Hidden entries are skipped, which also skips a Kubernetes ConfigMap's `..data` and
    timestamped directories while following its top-level symlinks.
    """
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files.extend(
                sorted(
                    c
                    for c in p.iterdir()
                    if c.suffix in RULE_SUFFIXES and not c.name.startswith(".") and c.is_file()
                )
            )
        else:
            files.append(p)
    return files


#: How many times a read of the rules that a ConfigMap update overlapped is tried.
_READ_ATTEMPTS = 3


def _data_links(paths: Sequence[str | os.PathLike[str]]) -> tuple[str | None, ...]:
    """Where each rules directory's `..data` link points; a ConfigMap update moves it."""
    out: list[str | None] = []
    for raw in paths:
        p = Path(raw)
        try:
            out.append(os.readlink((p if p.is_dir() else p.parent) / "..data"))
        except OSError:
            out.append(None)
    return tuple(out)


def read_sources(paths: Iterable[str | os.PathLike[str]]) -> list[tuple[str, bytes]]:
    """(display name, bytes) of every rules file, read once; raises ConfigError if unreadable.

    The files come from one version: each `x.yaml -> ..data/x.yaml` of a ConfigMap is
    resolved when it is opened, so a read that an update overlapped (its `..data` link
    moved meanwhile) could mix files of two versions, or miss one the update just removed;
    such a read is done again.
    """
    paths = list(paths)
    for _ in range(_READ_ATTEMPTS - 1):
        before = _data_links(paths)
        try:
            sources = _read_all(paths)
        except ConfigError:
            if _data_links(paths) == before:
                raise
            continue
        if _data_links(paths) == before:
            return sources
    return _read_all(paths)


def _read_all(paths: Sequence[str | os.PathLike[str]]) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    issues: list[ConfigIssue] = []
    for f in rule_files(paths):
        try:
            out.append((str(f), f.read_bytes()))
        except OSError as exc:
            issues.append(ConfigIssue(str(f), 0, "", f"cannot read: {exc.strerror or exc}"))
    if issues:
        raise ConfigError(issues)
    if not out:
        names = ", ".join(str(p) for p in paths)
        raise ConfigError([ConfigIssue(names, 0, "", "no rules files (*.yaml, *.yml) found")])
    return out


def content_hash(sources: Sequence[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in sources:
        h.update(os.path.basename(name).encode())
        h.update(b"\0")
        h.update(data)
        h.update(b"\0")
    return h.hexdigest()


def load_rules(paths: Iterable[str | os.PathLike[str]]) -> model.Rules:
    """Read, validate and build the rules in `paths`; raise ConfigError with every problem."""
    return build_rules(read_sources(paths))


def build_rules(sources: Sequence[tuple[str, bytes]]) -> model.Rules:
    docs: list[Doc] = []
    issues: list[ConfigIssue] = []
    for name, data in sources:
        doc = _parse(name, data, issues)
        if doc is not None:
            docs.append(doc)
    if issues:
        raise ConfigError(issues)
    builder = Builder(docs)
    rules = builder.build()
    if builder.issues:
        raise ConfigError(builder.issues)
    return rules


def _parse(name: str, data: bytes, issues: list[ConfigIssue]) -> Doc | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        issues.append(ConfigIssue(name, 1, "", f"not UTF-8 text: {exc.reason}"))
        return None
    try:
        node = yaml.compose(text, Loader=_Loader)
        value = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        issues.append(ConfigIssue(name, line, "", f"invalid YAML: {what}"))
        return None
    except yaml.YAMLError as exc:
        issues.append(ConfigIssue(name, 1, "", f"invalid YAML: {exc}"))
        return None
    if value is None:
        value = {}
    lines = Lines(node)
    doc = Doc(name, value if isinstance(value, dict) else {}, lines)
    if not isinstance(value, dict):
        issues.append(doc.issue([], "a rules file must be a mapping with gateways and/or routes"))
        return None
    found = sorted(_validator().iter_errors(value), key=lambda e: list(map(str, e.absolute_path)))
    for err in found:
        issues.append(doc.issue(list(err.absolute_path), _schema_message(err)))
    return None if found else doc


def _schema_message(err: jsonschema.ValidationError) -> str:
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        schema = err.schema if isinstance(err.schema, dict) else {}
        allowed = set(schema.get("properties", {}))
        extra = sorted(k for k in err.instance if k not in allowed)
        if extra and allowed:
            return f"unknown field(s) {', '.join(map(repr, extra))}; allowed: {', '.join(sorted(allowed))}"
    if err.validator == "oneOf" and err.context:
        best = jsonschema.exceptions.best_match(err.context)
        return str(best.message)
    return str(err.message)

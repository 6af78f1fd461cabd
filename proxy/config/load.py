"""Turns a rules directory (or files) into one validated, immutable `Rules` snapshot.

Owns: reading the files (a ConfigMap's from one version), YAML with line numbers, the JSON
Schema check (one validator, built once), and the pipeline YAML -> schema -> semantic checks
(`proxy.config.build`) -> frozen model. Every problem becomes a `ConfigIssue` naming file,
line and JSON pointer; `load_rules` raises `ConfigError` carrying all of them.
Must not: publish anything or touch runtime state; the store decides what to do with it.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import time
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

import jsonschema

from proxy.config import model
from proxy.config.build import Builder
from proxy.config.explain import Explainer
from proxy.config.issues import ConfigError, ConfigIssue, Doc
from proxy.config.yamldoc import DEFAULT_LIMITS, ReadLimits, parse, too_big

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_TOTAL_BYTES",
    "ConfigError",
    "ConfigIssue",
    "ReadLimits",
    "build_rules",
    "content_hash",
    "load_rules",
    "read_sources",
    "rule_files",
]

RULE_SUFFIXES = (".yaml", ".yml")
SCHEMA_ENV = "PAYSWITCH_SCHEMAS"


#: All rules files together; each one also has `ReadLimits.max_file_bytes`.
MAX_TOTAL_BYTES = 512 * 1024


def schema_dir() -> Path:
    """Where the JSON Schemas are: $PAYSWITCH_SCHEMAS, else inside the installed package
    (`proxy/schemas`, copied there when the wheel is built), else the source tree's
    top-level `schemas/`, their one copy in git."""
    env = os.environ.get(SCHEMA_ENV)
    if env:
        return Path(env)
    packaged = Path(str(importlib.resources.files("proxy"))) / "schemas"
    if (packaged / "rules.schema.json").is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "schemas"


@cache
def _schema() -> dict[str, object]:
    schema: dict[str, object] = json.loads(
        (schema_dir() / "rules.schema.json").read_text(encoding="utf-8")
    )
    return schema


def _whole_number(checker: object, instance: object) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


@cache
def _validator() -> jsonschema.protocols.Validator:
    schema = _schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    # JSON Schema lets `3.0` pass as an integer; the rules take integers as written, so a
    # weight, limit, threshold, attempt count or status is `3`, not `3.0` (the model and
    # the compiled request path hold them as int, and `on: [502.0]` would match nothing).
    strict = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        cls, type_checker=cls.TYPE_CHECKER.redefine("integer", _whole_number)
    )
    validator: jsonschema.protocols.Validator = strict(schema)
    return validator


@cache
def _explainer() -> Explainer:
    return Explainer(_schema())


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
    total = 0
    cap = DEFAULT_LIMITS.max_file_bytes
    for f in rule_files(paths):
        try:
            # A huge file is refused by its size, never read whole.
            size = f.stat().st_size
            if size > cap:
                issues.append(ConfigIssue(str(f), 1, "", too_big(size, DEFAULT_LIMITS)))
                continue
            data = f.read_bytes()
        except OSError as exc:
            issues.append(ConfigIssue(str(f), 0, "", f"cannot read: {exc.strerror or exc}"))
            continue
        total += len(data)
        if total > MAX_TOTAL_BYTES:
            issues.append(
                ConfigIssue(
                    str(f),
                    1,
                    "",
                    f"the rules files together exceed {MAX_TOTAL_BYTES:,} bytes; refused",
                )
            )
            break
        out.append((str(f), data))
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


def load_rules(
    paths: Iterable[str | os.PathLike[str]],
    limits: ReadLimits = DEFAULT_LIMITS,
    *,
    read_secrets: bool = True,
) -> model.Rules:
    """Read, validate and build the rules in `paths`; raise ConfigError with every problem.

    `read_secrets=False` checks where header values come from without reading them (CI,
    where the Secrets are not mounted); such rules are for checking, never for serving."""
    return build_rules(read_sources(paths), limits, read_secrets=read_secrets)


def build_rules(
    sources: Sequence[tuple[str, bytes]],
    limits: ReadLimits = DEFAULT_LIMITS,
    *,
    read_secrets: bool = True,
) -> model.Rules:
    docs: list[Doc] = []
    issues: list[ConfigIssue] = []
    total = 0
    deadline = time.monotonic() + limits.max_seconds
    for name, data in sources:
        total += len(data)
        if total > MAX_TOTAL_BYTES:
            issues.append(
                ConfigIssue(
                    name, 1, "", f"the rules files together exceed {MAX_TOTAL_BYTES:,} bytes"
                )
            )
            break
        doc = _parse(name, data, issues, limits, deadline)
        if doc is not None:
            docs.append(doc)
    if issues:
        raise ConfigError(issues)
    builder = Builder(docs, read_secrets=read_secrets)
    rules = builder.build()
    if builder.issues:
        raise ConfigError(builder.issues)
    return rules


def _parse(
    name: str, data: bytes, issues: list[ConfigIssue], limits: ReadLimits, deadline: float
) -> Doc | None:
    parsed = parse(name, data, issues, limits, deadline)
    if parsed is None:
        return None
    value = {} if parsed.value is None else parsed.value
    doc = Doc(name, value if isinstance(value, dict) else {}, parsed.lines)
    if not isinstance(value, dict):
        issues.append(doc.issue([], "a rules file must be a mapping with gateways and/or routes"))
        return None
    found = list(_validator().iter_errors(value))
    explained = [i for err in found for i in _explainer().issues(doc, err)]
    issues.extend(sorted(explained, key=lambda i: (i.line, i.pointer)))
    return None if found else doc

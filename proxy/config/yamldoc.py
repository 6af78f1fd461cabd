"""One rules file's YAML, read within bounds, as plain values with the line of every key.

Owns: the limits a rules file is read under (size, nesting depth, alias expansion, time),
the YAML 1.2 reading itself (ruamel.yaml: `on`/`yes` stay strings, positions are kept),
duplicate-key detection naming both lines, and `Lines`, which names the line of any JSON
pointer. Every problem is a `ConfigIssue`; nothing here raises anything else on bad input.
Must not: know the rules' schema or meaning (`proxy.config.load` and `build` do).

Why the limits: YAML aliases make a few hundred bytes expand to billions of nodes (the
"billion laughs"), and a deeply nested file makes any recursive reader overflow the stack.
Both are refused as ruamel's composer takes each parser event, before the node it starts
is built (and flow nesting even before the scanner, whose look-ahead is quadratic in it),
so memory and time stay bounded by the file's size.
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml import events as ev
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.composer import Composer
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.parser import RoundTripParser

from proxy.config.issues import ConfigIssue, pointer


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadLimits:
    """How much one rules file may ask of the loader."""

    max_file_bytes: int = 128 * 1024  # ~1.5 s to read in the worst case; examples are ~3 KiB
    max_depth: int = 32  # rules nest about 6 deep
    max_nodes: int = 100_000  # after expanding aliases; the example rules have ~600
    max_seconds: float = 3.0  # for all the files of one load together


DEFAULT_LIMITS = ReadLimits()


#: Quoted strings and comments, whose brackets do not nest anything.
_INERT = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\n]|\'\')*\'|(?:^|(?<=\s))#[^\n]*', re.M)
_BRACKETS = re.compile(r"[\[\]{}]")


def _flow_depth_over(text: str, limit: int) -> int | None:
    """The line where `[`/`{` nesting first passes `limit`, else None.

    Checked before the YAML scanner runs: it looks ahead through every open flow
    collection, which takes time quadratic in their nesting. Brackets inside plain text
    may count too, which can only make a file look deeper than it is.
    """
    depth = 0
    for m in _BRACKETS.finditer(_INERT.sub("", text)):
        depth = depth + 1 if m.group() in "[{" else max(depth - 1, 0)
        if depth > limit:
            return text.count("\n", 0, m.start()) + 1
    return None


class _Refused(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


@dataclass(slots=True)
class _Frame:
    mapping: bool
    anchor: str | None
    nodes: int = 1
    expect_key: bool = True
    keys: dict[str, int] | None = None


class _Checker:
    """Sees every YAML event as the composer takes it, refusing what would be too costly
    to build before it is built. Raises `_Refused` on a limit; notes duplicate keys."""

    def __init__(
        self, limits: ReadLimits, issues: list[ConfigIssue], name: str, deadline: float
    ) -> None:
        self.limits = limits
        self.issues = issues
        self.name = name
        self.deadline = deadline
        self.anchors: dict[str, int] = {}
        self.stack: list[_Frame] = []
        self.count = 0
        self.total = 0

    def see(self, event: ev.Event) -> None:
        limits, stack = self.limits, self.stack
        line = event.start_mark.line + 1 if event.start_mark is not None else 1
        self.count += 1
        if self.count % 1024 == 0 and time.monotonic() > self.deadline:
            raise _Refused(line, f"took longer than {limits.max_seconds:g}s to read; refused")
        if isinstance(event, ev.MappingStartEvent | ev.SequenceStartEvent):
            if len(stack) >= limits.max_depth:
                raise _Refused(line, f"nested deeper than {limits.max_depth} levels; refused")
            mapping = isinstance(event, ev.MappingStartEvent)
            _key_shape(stack, line)
            stack.append(_Frame(mapping=mapping, anchor=event.anchor, keys={} if mapping else None))
        elif isinstance(event, ev.ScalarEvent | ev.AliasEvent):
            size = 1
            if isinstance(event, ev.AliasEvent):
                size = self.anchors.get(str(event.anchor), 1)
            elif event.anchor is not None:
                self.anchors[str(event.anchor)] = 1
            if stack and stack[-1].mapping and stack[-1].expect_key:
                if isinstance(event, ev.AliasEvent):
                    raise _Refused(line, "an alias cannot be a key; write the key out")
                _note_key(stack[-1], str(event.value), line, self.issues, self.name)
            self.total = _add(stack, size, self.total, limits, line)
        elif isinstance(event, ev.MappingEndEvent | ev.SequenceEndEvent):
            done = stack.pop()
            if done.anchor is not None:
                self.anchors[str(done.anchor)] = done.nodes
            if stack:
                stack[-1].nodes += done.nodes - 1  # its own 1 was counted when it started
                if stack[-1].nodes > limits.max_nodes:
                    raise _too_many(limits, line)
                stack[-1].expect_key = not stack[-1].expect_key


class _CheckedParser(RoundTripParser):
    """The round-trip parser, showing each event to the reader's checker as it is taken."""

    def get_event(self) -> Any:
        event = super().get_event()
        self.loader.checker.see(event)
        return event


class _Composer(Composer):
    """ruamel's composer without its warning for an anchor defined twice: YAML allows it
    (an alias means the latest node of that anchor, which is also the one the checker
    sizes it by), and the warning alone would be a log line on every reload."""

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader)
        self.warn_double_anchors = False


class _Reader(YAML):
    """ruamel.yaml's round-trip reader (YAML 1.2, positions kept) with our checks."""

    def __init__(self, checker: _Checker) -> None:
        super().__init__(typ="rt", pure=True)
        self.Parser = _CheckedParser
        self.Composer = _Composer
        self.allow_duplicate_keys = True  # the checker reports them, with both lines
        self.checker = checker


def _key_shape(stack: list[_Frame], line: int) -> None:
    if stack and stack[-1].mapping and stack[-1].expect_key:
        raise _Refused(line, "a key must be plain text, not a mapping or a list")
    if stack:
        stack[-1].nodes += 1


def _note_key(frame: _Frame, key: str, line: int, issues: list[ConfigIssue], name: str) -> None:
    assert frame.keys is not None
    first = frame.keys.get(key)
    if first is not None and key != "<<":
        issues.append(
            ConfigIssue(name, line, "", f"duplicate key `{key}`: first written on line {first}")
        )
    else:
        frame.keys[key] = line


def _add(stack: list[_Frame], size: int, total: int, limits: ReadLimits, line: int) -> int:
    total += size
    if stack:
        top = stack[-1]
        top.nodes += size
        top.expect_key = not top.expect_key if top.mapping else top.expect_key
    if total > limits.max_nodes or (stack and stack[-1].nodes > limits.max_nodes):
        raise _too_many(limits, line)
    return total


def _too_many(limits: ReadLimits, line: int) -> _Refused:
    return _Refused(
        line,
        f"expands to more than {limits.max_nodes:,} values (aliases included); refused",
    )


class Lines:
    """Names the line a JSON pointer inside one document was written on."""

    def __init__(self, root: object) -> None:
        self._root = root

    def line(self, parts: Sequence[object]) -> int:
        node = self._root
        best = 1
        for part in parts:
            if isinstance(node, CommentedMap) and part in node:
                best = node.lc.key(part)[0] + 1
                node = node[part]
            elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
                best = node.lc.item(part)[0] + 1
                node = node[part]
            else:
                break
        return best


@dataclass(frozen=True, slots=True)
class Parsed:
    value: object  # plain dict/list/str/int/float/bool/None (dates stay dates)
    lines: Lines


def too_big(size: int, limits: ReadLimits) -> str:
    return (
        f"file is {size:,} bytes; rules files are limited to "
        f"{limits.max_file_bytes:,} bytes (split the rules into several files)"
    )


def parse(
    name: str,
    data: bytes,
    issues: list[ConfigIssue],
    limits: ReadLimits,
    deadline: float | None = None,
) -> Parsed | None:
    """The document in `data`, or None with the reasons appended to `issues`.

    `deadline` (time.monotonic()) is shared by the files of one load; by default this file
    gets `limits.max_seconds` of its own."""
    if deadline is None:
        deadline = time.monotonic() + limits.max_seconds
    if len(data) > limits.max_file_bytes:
        issues.append(ConfigIssue(name, 1, "", too_big(len(data), limits)))
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        issues.append(ConfigIssue(name, 1, "", f"not UTF-8 text: {exc.reason}"))
        return None
    before = len(issues)
    try:
        deep = _flow_depth_over(text, limits.max_depth)
        if deep is not None:
            raise _Refused(deep, f"nested deeper than {limits.max_depth} levels; refused")
        root = _Reader(_Checker(limits, issues, name, deadline)).load(text)
    except _Refused as exc:
        issues.append(ConfigIssue(name, exc.line, "", exc.message))
        return None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        what = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        if "another document" in what:
            what = "one YAML document per file: remove the `---` separator"
        else:
            what = f"invalid YAML: {what}"
        issues.append(ConfigIssue(name, line, "", what))
        return None
    except (YAMLError, ValueError, TypeError, RecursionError) as exc:
        # ruamel raises plain ValueError/TypeError for a few malformed scalars and tags.
        issues.append(ConfigIssue(name, 1, "", f"invalid YAML: {exc}"))
        return None
    lines = Lines(root)
    value = _plain(root, [], lines, issues, name)
    if len(issues) > before:
        return None
    return Parsed(value=value, lines=lines)


def _plain(
    node: object, where: list[object], lines: Lines, issues: list[ConfigIssue], name: str
) -> object:
    """`node` as plain Python values, so the model and the admin API see no ruamel types."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if not isinstance(key, str):
                issues.append(
                    ConfigIssue(
                        name,
                        lines.line([*where, key]),
                        pointer(where),
                        f'key {key!r} must be text: quote it ("{key}")',
                    )
                )
                continue
            out[key] = _plain(value, [*where, key], lines, issues, name)
        return out
    if isinstance(node, list):
        return [_plain(v, [*where, i], lines, issues, name) for i, v in enumerate(node)]
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    if isinstance(node, datetime.date):
        return node  # the schema refuses it where text is expected, naming the line
    return str(node)

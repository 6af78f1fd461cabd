"""Where a rules problem was written: file, line, JSON pointer, and what is wrong.

Owns: `ConfigIssue` and `ConfigError` (what every rules failure becomes), and `Doc`, one
parsed rules file that can name the line of any JSON pointer inside it.
Must not: read files or judge the rules; the loader and the builder do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.config import model

#: Longest message an issue keeps: a 50 MB value must not be copied into logs and events.
MAX_MESSAGE = 500
#: Most issues a ConfigError keeps; the rest are counted in a last one.
MAX_ISSUES = 50


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    file: str
    line: int
    pointer: str
    message: str

    def __post_init__(self) -> None:
        for name, limit in (("message", MAX_MESSAGE), ("pointer", 200), ("file", 300)):
            text = getattr(self, name)
            if len(text) > limit:
                object.__setattr__(self, name, text[: limit - 1] + "…")

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.pointer or '/'}: {self.message}"

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "pointer": self.pointer,
            "message": self.message,
        }


class ConfigError(Exception):
    """The rules are not valid; `issues` lists every problem found."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        kept = list(issues[:MAX_ISSUES])
        if len(issues) > MAX_ISSUES:
            last = issues[MAX_ISSUES]
            more = f"and {len(issues) - MAX_ISSUES} more problem(s) not shown"
            kept.append(ConfigIssue(last.file, last.line, "", more))
        self.issues = tuple(kept)
        super().__init__("\n".join(str(i) for i in self.issues))


def pointer(parts: Iterable[object]) -> str:
    out = []
    for p in parts:
        out.append(str(p).replace("~", "~0").replace("/", "~1"))
    return "/" + "/".join(out) if out else ""


class LineIndex(Protocol):
    """Names the line a JSON pointer inside one document was written on."""

    def line(self, parts: Sequence[object]) -> int: ...


@dataclass(frozen=True, slots=True)
class Doc:
    file: str
    data: Mapping[str, Any]
    lines: LineIndex

    def issue(self, parts: Sequence[object], message: str) -> ConfigIssue:
        return ConfigIssue(self.file, self.lines.line(parts), pointer(parts), message)

    def source(self, parts: Sequence[object]) -> model.Source:
        return model.Source(file=self.file, line=self.lines.line(parts))

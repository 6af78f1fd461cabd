"""Where a rules problem was written: file, line, JSON pointer, and what is wrong.

Owns: `ConfigIssue` and `ConfigError` (what every rules failure becomes), and `Doc`, one
parsed rules file that can name the line of any JSON pointer inside it.
Must not: read files or judge the rules; the loader and the builder do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from proxy.config import model


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    file: str
    line: int
    pointer: str
    message: str

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
        self.issues = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


def pointer(parts: Iterable[object]) -> str:
    out = []
    for p in parts:
        out.append(str(p).replace("~", "~0").replace("/", "~1"))
    return "/" + "/".join(out) if out else ""


class Lines:
    """Maps a JSON pointer inside one YAML document to the line it was written on."""

    def __init__(self, node: yaml.Node | None) -> None:
        self._node = node

    def line(self, parts: Sequence[object]) -> int:
        node = self._node
        if node is None:
            return 1
        best = node.start_mark.line + 1
        for part in parts:
            nxt: yaml.Node | None = None
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                        nxt = value
                        best = key.start_mark.line + 1
                        break
            elif (
                isinstance(node, yaml.SequenceNode)
                and isinstance(part, int)
                and 0 <= part < len(node.value)
            ):
                nxt = node.value[part]
                best = nxt.start_mark.line + 1
            if nxt is None:
                break
            node = nxt
        return best


@dataclass(frozen=True, slots=True)
class Doc:
    file: str
    data: Mapping[str, Any]
    lines: Lines

    def issue(self, parts: Sequence[object], message: str) -> ConfigIssue:
        return ConfigIssue(self.file, self.lines.line(parts), pointer(parts), message)

    def source(self, parts: Sequence[object]) -> model.Source:
        return model.Source(file=self.file, line=self.lines.line(parts))

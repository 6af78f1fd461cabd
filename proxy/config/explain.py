"""JSON Schema failures of a rules file, said the way a person can act on them.

Owns: turning a `jsonschema.ValidationError` into `ConfigIssue`s: an unknown key at its own
line with the closest known key ("did you mean `timeouts`?") or the block it belongs in; a
duration, size or rate of the wrong form with the form and an example; the branch of a
`oneOf` the value was meant for; type names as YAML users know them.
Must not: read files, build the validator or judge meaning across files.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jsonschema

from proxy.config.issues import ConfigIssue, Doc
from proxy.config.units import DURATION_FORM, RATE_FORM, SIZE_FORM

#: `user:password@` in anything that looks like a URL: never repeated in a message.
_USERINFO = re.compile(r"(//)[^/@\s]*@")

#: What a value of each named `$defs` entry looks like, for messages.
FORMS = {
    "duration": DURATION_FORM,
    "size": SIZE_FORM,
    "rate": RATE_FORM,
    "name": "a name of lower-case letters, digits, `.`, `_` or `-` (up to 63), like stripe-eu",
    "region": "a region of lower-case letters, digits, `_` or `-` (up to 32), like eu",
    "header_name": "an HTTP header name, like X-Region",
}

_TYPES = {
    "object": "a mapping (key: value)",
    "array": "a list",
    "string": "text",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "null": "nothing",
}


def show(value: object, limit: int = 60) -> str:
    """`value` as it would be written in YAML, cut to `limit` characters."""
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = "a mapping"
    elif isinstance(value, list):
        text = "a list"
    else:
        text = str(value)
    text = _USERINFO.sub(r"\1…@", text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"`{text}`" if not isinstance(value, dict | list) else text


class Explainer:
    """Explains one validator's errors; built once per schema."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self._schema = schema
        defs = schema.get("$defs", {})
        self._forms = {id(defs[k]): form for k, form in FORMS.items() if k in defs}

    def issues(self, doc: Doc, err: jsonschema.ValidationError) -> Iterator[ConfigIssue]:
        path = list(err.absolute_path)
        instance: Any = err.instance
        wanted: Any = err.validator_value
        schema: Any = err.schema
        if "propertyNames" in err.schema_path:
            path.append(instance)  # a bad key: point at the key's own line
        form = self._forms.get(id(err.schema))
        if form is not None:
            yield doc.issue(path, _wrong_form(instance, form))
        elif err.validator == "additionalProperties" and isinstance(instance, dict):
            yield from self._unknown_keys(doc, path, err)
        elif err.validator == "oneOf" and err.context:
            yield from self._one_of(doc, err)
        elif err.validator == "type":
            want = wanted
            wants = [want] if isinstance(want, str) else list(want)
            names = " or ".join(_TYPES.get(w, w) for w in wants)
            yield doc.issue(path, f"expected {names}, got {show(instance)}")
        elif err.validator == "enum":
            yield doc.issue(path, _not_one_of(instance, list(wanted)))
        elif err.validator == "const":
            yield doc.issue(path, f"expected `{wanted}`, got {show(instance)}")
        elif err.validator == "required":
            missing = [k for k in wanted if k not in instance]
            yield doc.issue(path, "missing " + ", ".join(f"`{k}`" for k in missing))
        elif err.validator in ("maximum", "minimum", "exclusiveMinimum", "exclusiveMaximum"):
            word = "at most" if "aximum" in err.validator else "at least"
            if err.validator.startswith("exclusive"):
                word = "less than" if "aximum" in err.validator else "more than"
            yield doc.issue(path, f"{show(instance)} must be {word} {wanted:,}")
        elif err.validator == "pattern" and isinstance(schema, dict) and "description" in schema:
            yield doc.issue(path, f"{show(instance)} does not fit: {schema['description']}")
        else:
            yield doc.issue(path, _cut(err.message))

    def _unknown_keys(
        self, doc: Doc, path: list[Any], err: jsonschema.ValidationError
    ) -> Iterator[ConfigIssue]:
        schema: Any = err.schema if isinstance(err.schema, dict) else {}
        instance: Any = err.instance
        allowed = sorted(schema.get("properties", {}))
        for key in instance:
            if key in allowed:
                continue
            message = f"unknown key {show(key)}"
            close = _closest(str(key), allowed)
            home = self._home_of(str(key), schema)
            if home:
                message += f": it belongs inside `{home}` (check its indentation)"
            elif close:
                message += f"; did you mean `{close}`?"
            elif allowed:
                message += "; known keys here: " + ", ".join(allowed)
            yield doc.issue([*path, key], message)

    def _home_of(self, key: str, schema: Mapping[str, Any]) -> str | None:
        """The child block of `schema` that accepts `key`: a mis-indented key's real home."""
        for name, child in schema.get("properties", {}).items():
            for sub in self._objects(child):
                if key in sub.get("properties", {}):
                    return str(name)
        return None

    def _objects(self, schema: Any, depth: int = 0) -> Iterator[Mapping[str, Any]]:
        if not isinstance(schema, dict) or depth > 4:
            return
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            yield from self._objects(self._schema["$defs"].get(ref[8:]), depth + 1)
        if "properties" in schema:
            yield schema
        for branch in schema.get("oneOf", ()):
            yield from self._objects(branch, depth + 1)

    def _one_of(self, doc: Doc, err: jsonschema.ValidationError) -> Iterator[ConfigIssue]:
        """Explain the branch the value was meant for: the one whose type it has."""
        branches: dict[int, list[jsonschema.ValidationError]] = {}
        for sub in err.context or ():
            branches.setdefault(int(sub.relative_schema_path[0]), []).append(sub)
        meant = [
            errs
            for errs in branches.values()
            if not any(e.validator in ("type", "const") and not e.relative_path for e in errs)
        ]
        if len(meant) == 1:
            for sub in meant[0]:
                yield from self.issues(doc, sub)
            return
        if not meant:
            wanted: list[str] = []
            for errs in branches.values():
                for e in errs:
                    if e.relative_path or e.validator not in ("type", "const"):
                        continue
                    value: Any = e.validator_value
                    if e.validator == "const":
                        wanted.append(show(value))
                    else:
                        for w in [value] if isinstance(value, str) else value:
                            wanted.append(_TYPES.get(w, w))
            unique = list(dict.fromkeys(wanted))
            if unique:
                yield doc.issue(
                    list(err.absolute_path),
                    f"expected {', or '.join(unique)}, got {show(err.instance)}",
                )
                return
        best = jsonschema.exceptions.best_match(err.context or ())
        yield doc.issue(list(err.absolute_path), _cut(best.message if best else err.message))


def _wrong_form(value: object, form: str) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool) and "duration" in form:
        return f"{show(value)} needs a unit: write {form}"
    return f"{show(value)} is not {form}"


def _not_one_of(value: object, options: Sequence[object]) -> str:
    texts = [show(o) for o in options]
    message = f"{show(value)} is not one of " + ", ".join(texts)
    if isinstance(value, str):
        close = _closest(value, [str(o) for o in options])
        if close:
            message += f"; did you mean `{close}`?"
    return message


def _closest(word: str, options: Sequence[str]) -> str | None:
    """The option nearest `word`, if one is near. difflib is imported here, when rules
    are refused: a sidecar that loaded good rules would carry it (0.2 MiB) for nothing."""
    import difflib

    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return close[0] if close else None


def _cut(text: str, limit: int = 300) -> str:
    text = _USERINFO.sub(r"\1…@", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"

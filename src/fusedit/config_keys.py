"""Every ``key=value`` override key of a config dataclass, with its type, default and meaning
(``fusedit configs --keys``, ``fusedit train --list-keys``).

A key's meaning is its field's ``metadata["help"]`` when given, else its entry in the ``Attributes:`` section of its
dataclass's docstring (Google style; one entry may document several fields: ``lr, weight_decay: AdamW.``).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from fusedit.config import _type_name

_ENTRY = re.compile(r"^(?P<names>[A-Za-z_][\w]*(?:\s*,\s*[A-Za-z_][\w]*)*)\s*(?:\([^)]*\))?:\s*(?P<text>.*)$")


@dataclass(frozen=True)
class KeyHelp:
    """One override key: dotted ``key``, its ``type`` as the config errors name it, ``default`` (as YAML) and
    ``help`` (empty when undocumented)."""

    key: str
    type: str
    default: str
    help: str


def attribute_docs(cls: type) -> dict[str, str]:
    """``{field name: text}`` from the ``Attributes:`` section of ``cls``'s docstring (continuation lines joined)."""
    lines = (inspect.getdoc(cls) or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:") + 1
    except StopIteration:
        return {}
    docs: dict[str, list[str]] = {}
    indent: int | None = None
    current: list[str] = []
    for line in lines[start:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:
            break  # the next section
        match = _ENTRY.match(line.strip()) if depth == indent else None
        if match:
            current = [match["text"]]
            for name in match["names"].split(","):
                docs[name.strip()] = current  # one list shared by the names of a grouped entry
        else:
            current.append(line.strip())
    return {name: " ".join(parts) for name, parts in docs.items()}


def _yaml(value: Any) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def iter_keys(cls: type, instance: Any = None, prefix: str = "") -> Iterator[KeyHelp]:
    """The keys of dataclass ``cls`` (nested sections flattened to dotted keys), defaults from ``instance`` (a
    loaded config) or from the field defaults."""
    instance = cls() if instance is None else instance
    hints = typing.get_type_hints(cls)
    docs = attribute_docs(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        key, tp, value = f"{prefix}{field.name}", hints[field.name], getattr(instance, field.name)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, value, key + ".")
            continue
        help_text = str(field.metadata.get("help") or docs.get(field.name, ""))
        yield KeyHelp(key, _type_name(tp), _yaml(value), " ".join(help_text.split()))


def format_keys(keys: list[KeyHelp]) -> str:
    """One block per key: ``key: type = default`` then its meaning, indented."""
    blocks = []
    for item in keys:
        blocks.append(f"{item.key}: {item.type} = {item.default}\n    {item.help or '(undocumented)'}")
    return "\n".join(blocks)

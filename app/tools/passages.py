"""The numbered-passage text retrieval tools hand the model, and its reader.

    Knowledge-base passages:

    [1] <title> <url, when there is one>
    <text>

    [2] ...

`parse_passages` reads it back; the offline provider builds its cited answer
from it. This module imports nothing from the app, so both app.llm and
app.tools can use it without an import cycle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


def format_passages(heading: str, items: list[dict[str, Any]]) -> str:
    """Numbered passages for the model: a heading line, then `[n] title` and the text."""
    blocks = [heading]
    for n, item in enumerate(items, start=1):
        head = f"[{n}] {item.get('title') or item['id']}"
        if item.get("url"):
            head += f" <{item['url']}>"
        blocks.append(f"{head}\n{str(item.get('text', '')).strip()}")
    return "\n\n".join(blocks)


@dataclass(frozen=True)
class Passage:
    number: int
    title: str
    text: str


_HEAD = re.compile(r"^\[(\d+)\] (.+?)(?: <[^>]*>)?$", re.MULTILINE)


def parse_passages(content: str) -> list[Passage]:
    """The passages `format_passages` wrote, in order; [] for anything else."""
    heads = list(_HEAD.finditer(content))
    out = []
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(content)
        out.append(Passage(int(m.group(1)), m.group(2), content[m.end() : end].strip()))
    return out

"""Parse Server-Sent Events the way a browser does, for the API tests."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Frame:
    id: str | None
    event: str
    data: Any


def frames(lines: Iterable[str]) -> list[Frame]:
    out: list[Frame] = []
    fields: dict[str, str] = {}
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if "data" in fields:
                out.append(Frame(fields.get("id"), fields.get("event", "message"),
                                 json.loads(fields["data"])))
            fields = {}
            continue
        if line.startswith(":"):
            continue  # comment / ping
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        fields[name] = f"{fields[name]}\n{value}" if name == "data" and name in fields else value
    return out

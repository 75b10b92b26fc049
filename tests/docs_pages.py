"""The README and the pages under docs/, as the tests that hold them to the code read them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def pages() -> dict[Path, str]:
    """README.md and every docs/*.md, by path."""
    return {p: p.read_text() for p in [README, *sorted(DOCS.glob("*.md"))]}


def prose_lines(text: str) -> list[tuple[bool, str]]:
    """Each line with whether it sits inside a fenced code block."""
    out: list[tuple[bool, str]] = []
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            out.append((True, line))
            continue
        out.append((fenced, line))
    return out


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every heading outside code blocks."""
    found = []
    for fenced, line in prose_lines(text):
        m = None if fenced else _HEADING.match(line)
        if m:
            found.append((len(m.group(1)), m.group(2)))
    return found


def section(text: str, title: str) -> str:
    """The body under the heading `title`, up to the next heading of its level or above."""
    lines = prose_lines(text)
    start = level = None
    for i, (fenced, line) in enumerate(lines):
        m = None if fenced else _HEADING.match(line)
        if not m:
            continue
        if start is None and m.group(2) == title:
            start, level = i + 1, len(m.group(1))
        elif start is not None and level is not None and len(m.group(1)) <= level:
            return "\n".join(line for _, line in lines[start:i])
    if start is None:
        raise AssertionError(f"no heading {title!r}")
    return "\n".join(line for _, line in lines[start:])


def shell_blocks(text: str) -> list[str]:
    """The bodies of the ```sh blocks."""
    return re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)


def slug(title: str) -> str:
    """The anchor a code host (GitHub's rule) gives a heading: lowercase, punctuation dropped
    (`_` and `-` kept), each space a hyphen."""
    plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", plain.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a page, duplicates numbered as the code host numbers them."""
    seen: dict[str, int] = {}
    out = set()
    for _, title in headings(text):
        base = slug(title)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out

"""Every relative link in the README and docs/ leads somewhere: an existing file, and for
`#anchor`, a heading of that page; every page is reachable from both indexes."""

from __future__ import annotations

import re
from pathlib import Path

from docs_pages import DOCS, README, ROOT, anchors, pages, prose_lines

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_CODE = re.compile(r"`[^`]*`")


def _links(text: str) -> list[str]:
    found = []
    for fenced, line in prose_lines(text):
        if not fenced:
            found += _LINK.findall(_CODE.sub("", line))
    return found


def _broken(page: Path, text: str) -> list[str]:
    broken = []
    for target in _links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.is_relative_to(ROOT) or not dest.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest.read_text())):
            broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def test_every_relative_link_in_the_readme_and_docs_resolves_to_a_file_and_heading() -> None:
    texts = pages()
    assert len(texts) > 2 and sum(len(_links(t)) for t in texts.values()) > 20
    assert [b for p, t in texts.items() for b in _broken(p, t)] == []


def test_a_link_to_a_missing_page_or_heading_is_reported(tmp_path: Path) -> None:
    page = DOCS / "sessions.md"
    text = "[a](sessions.md#sessions) [b](nowhere.md) [c](sessions.md#nowhere) [d](#append-cost)"
    assert _broken(page, text) == [
        "sessions.md: nowhere.md (no such file)",
        "sessions.md: sessions.md#nowhere (no such heading)",
        "sessions.md: #append-cost (no such heading)",
    ]


def test_every_docs_page_is_listed_in_the_docs_index_and_the_readme() -> None:
    index = _links((DOCS / "README.md").read_text())
    readme = _links(README.read_text())
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "README.md":
            assert page.name in index, f"{page.name} missing from docs/README.md"
            assert f"docs/{page.name}" in readme, f"{page.name} missing from README.md"


def test_the_mkdocs_nav_lists_every_docs_page() -> None:
    nav = re.findall(r"^  - [^:]+: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert sorted(nav) == sorted(p.name for p in DOCS.glob("*.md"))

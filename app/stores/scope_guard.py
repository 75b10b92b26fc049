"""The last check before a search result is used: its scope is one the caller may read.

Every KNN over `idx:cache`, `idx:kb` and `idx:memory` already filters by a TAG
(scope or user). This re-reads the tag value the row came back with and compares
it, as bytes-exact Python strings, with what the caller may see. It catches a
filter that matched more than it said: an index created before its TAG fields
were CASESENSITIVE (RediSearch folds `user:Alice` onto `user:alice`), or an
escaping slip. A row that fails is dropped and logged as a warning, never served.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

log = logging.getLogger("backbone.scope")

Row = tuple[str, dict[str, str]]


def admitted(rows: list[Row], field: str, allowed: Collection[str], where: str) -> list[Row]:
    """The rows whose `field` is exactly one of `allowed`; the others are logged and dropped."""
    kept = []
    for key, fields in rows:
        value = fields.get(field)
        if value is not None and value in allowed:
            kept.append((key, fields))
        else:
            log.warning(
                "%s: dropped %s, its %s %r is not one the caller may read %r",
                where, key, field, value, sorted(allowed),
            )  # fmt: skip
    return kept

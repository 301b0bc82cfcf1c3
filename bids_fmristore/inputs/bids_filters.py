"""``--bids-filter-file`` queries: checked up front, then translated for pybids."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path

from bids_fmristore.errors import UsageError

__all__ = ["QUERIES", "check_filters", "pybids_filters"]

#: the queries a filter file may hold: BOLD runs and their brain masks
QUERIES = ("bold", "mask")


def check_filters(filters: Mapping) -> None:
    """Raise :class:`UsageError` for bad queries or entities, before the slow indexing.

    Entities are those of pybids' ``bids`` and ``derivatives`` configurations (pybids itself
    raises a bare ValueError mid-query); derivatives ones (``desc``, ``res``) are accepted on
    raw BIDS too, where they simply match no file.
    """
    import bids.layout

    valid = sorted({entity["name"] for config in ("bids", "derivatives") for entity in json.loads(
        (Path(bids.layout.__file__).parent / "config" / f"{config}.json").read_text())["entities"]})
    scalar = (str, int, float, type(None))
    for query, entities in filters.items():
        if query not in QUERIES:
            raise UsageError(f"--bids-filter-file: unknown query {query!r} "
                             f"(valid queries: {', '.join(QUERIES)})")
        if not isinstance(entities, Mapping):
            raise UsageError(f"--bids-filter-file: query {query!r} must be an object of "
                             f"entity filters, got {json.dumps(entities)}")
        for name, value in entities.items():
            if name not in valid:
                close = difflib.get_close_matches(name, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UsageError(f"--bids-filter-file: unknown entity {name!r} in query "
                                 f"{query!r}{hint}; valid entities: {', '.join(valid)}")
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, bool) or not isinstance(v, scalar) for v in values):
                raise UsageError(f"--bids-filter-file: {query}.{name} = {json.dumps(value)}: "
                                 'expected a string, a number, null, "*" or a list of these')


def pybids_filters(filters: Mapping) -> dict:
    """JSON filters → pybids: ``null`` means "entity absent", ``"*"`` means "any value"."""
    from bids.layout import Query

    def convert(value):
        if value is None:
            return Query.NONE
        if value == "*":
            return Query.ANY
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    return {key: convert(value) for key, value in filters.items()}

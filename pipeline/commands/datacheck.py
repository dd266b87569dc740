"""Every data file a recipe needs that is not there, with where its set is published (the
`published:` key of conf/data/public.yaml's sources), before any record is read: `medpipe validate`
lists them all at once instead of stopping at the first."""
from __future__ import annotations

import os
from typing import Any


def published_at(data: dict) -> dict[str, str]:
    """path -> where published, from every source of the recipe's `data:` that says so (a recipe
    may name a set by its bare path, e.g. {path: ${data.pretrain}, dedup: near})."""
    out: dict[str, str] = {}
    for value in data.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict) and item.get("published") and isinstance(item.get("path"), str):
                out[item["path"]] = str(item["published"])
    return out


def missing_data(plans: list[Any], data: dict | None = None) -> list[str]:
    from medpipe.data import DataError, parse_spec
    from medpipe.data.sources import expand_paths
    from medpipe.plan import data_specs

    where_published = published_at(data or {})
    seen: set[str] = set()
    out: list[str] = []

    def add(where: str, path: str, why: str) -> None:
        if path not in seen:
            seen.add(path)
            out.append(f"stages.{where}: {path}: {why}")

    for plan in plans:
        for name, spec in data_specs(plan.params).items():
            where = f"{plan.name}.{name}"
            try:
                sources = parse_spec(spec)
            except DataError as e:
                if e.reason in ("missing", "missing_file"):
                    add(where, str(e.path or name), e.problem)
                continue
            for src in sources:
                try:
                    expand_paths(src)
                except DataError as e:
                    if e.reason == "missing_file":
                        known = where_published.get(src.path)
                        add(where, src.path, e.problem + (f" (published: {known})" if known and not src.published else ""))
                if isinstance(src.ids, str) and not os.path.isfile(src.ids):
                    add(where, src.ids, "ids file not found" + (f" (published: {src.published})" if src.published else ""))
    return out

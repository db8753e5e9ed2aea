"""Output shared by every benchmark: table, CSV with run metadata, one JSON line last."""

from __future__ import annotations

import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from coordinator.records import json_line, run_metadata, write_csv


def default_csv(name: str) -> Path:
    return Path("results") / f"bench-{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}.csv"


def table(title: str, rows: list[dict], columns: list[str] | None = None) -> Table:
    """A table of dict rows; floats shown with 3 significant decimals."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*[_fmt(r.get(c, "")) for c in columns])
    return t


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def emit(name: str, rows: list[dict], summary: dict, tables: list[Table], csv_path: Path | None, json_out: bool,
         console: Console, meta_extra: dict | None = None) -> Path:
    """Print tables, write CSV (rows + metadata columns), print the JSON line last if asked."""
    meta = run_metadata({"benchmark": name, **(meta_extra or {})})
    for t in tables:
        console.print(t)
    path = write_csv(csv_path or default_csv(name), rows, meta)
    console.print(f"results: {path}", highlight=False)
    if json_out:
        print(json_line({"benchmark": name, "csv": str(path), "meta": meta, **summary}), flush=True)
    return path

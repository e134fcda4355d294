"""A job's results as a file: one row per item, in item order, streamed from ``rlmq.jobs.results``.

``jsonl`` keeps each row whole (outputs and usage as objects); ``csv`` and ``parquet`` flatten it to
``COLUMNS`` (outputs as a JSON string, usage as paid cost and tokens). Parquet needs ``pyarrow``
(``pip install 'rlmq[parquet]'``); it is written in row groups of ``PARQUET_ROWS`` rows, so a
million items export in the memory of one group.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any

from rlmq.jobs import results

if TYPE_CHECKING:
    from rlmq.client import Client

__all__ = ["COLUMNS", "ExportError", "export_results", "format_of"]

COLUMNS = ("item", "run_id", "status", "error", "outputs", "cost_paid", "tokens")
PARQUET_ROWS = 10_000


class ExportError(Exception):
    """The results cannot be written in the asked format (a one-line reason)."""


def format_of(path: str | None) -> str:
    """The format a file name asks for: ``.csv``, ``.parquet``, else JSON lines (stdout too)."""
    for fmt in ("csv", "parquet"):
        if path and path.endswith("." + fmt):
            return fmt
    return "jsonl"


def _flat(row: dict[str, Any]) -> tuple[Any, ...]:
    usage = row["usage"]
    outputs = json.dumps(row["outputs"], ensure_ascii=False) if row["outputs"] is not None else None
    return (row["item"], row["run_id"], row["status"], row["error"], outputs, float(usage.get("cost_paid", 0.0)),
            int(usage.get("input_tokens", 0) + usage.get("output_tokens", 0)))


def export_results(client: Client, job_id: str, out: IO[str] | str, fmt: str = "jsonl") -> int:
    """Write every item's row to ``out`` (a text handle for jsonl/csv, a path for parquet); how many rows."""
    rows = results(client, job_id)
    if fmt == "parquet":
        if not isinstance(out, str):
            raise ExportError("parquet is written to a file: give -o NAME.parquet")
        return _parquet(rows, out)
    handle = open(out, "w", encoding="utf-8", newline="") if isinstance(out, str) else out  # noqa: SIM115
    try:
        return _csv(rows, handle) if fmt == "csv" else _jsonl(rows, handle)
    finally:
        if isinstance(out, str):
            handle.close()


def _jsonl(rows: Iterable[dict[str, Any]], handle: IO[str]) -> int:
    n = 0
    for row in rows:
        handle.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        n += 1
    return n


def _csv(rows: Iterable[dict[str, Any]], handle: IO[str]) -> int:
    writer = csv.writer(handle)
    writer.writerow(COLUMNS)
    n = 0
    for row in rows:
        writer.writerow(["" if v is None else v for v in _flat(row)])
        n += 1
    return n


def _parquet(rows: Iterable[dict[str, Any]], path: str) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ExportError("writing .parquet needs pyarrow: pip install pyarrow (or use .jsonl / .csv)") from None
    types = [pa.int64(), pa.string(), pa.string(), pa.string(), pa.string(), pa.float64(), pa.int64()]
    schema = pa.schema(list(zip(COLUMNS, types, strict=True)))
    n = 0
    with pq.ParquetWriter(path, schema) as writer:
        group: list[tuple[Any, ...]] = []

        def flush() -> None:
            columns: list[Any] = list(zip(*group, strict=True)) if group else [[] for _ in COLUMNS]
            writer.write_table(pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, schema,
                                                                                            strict=True)],
                                                    schema=schema))
            group.clear()

        for row in rows:
            group.append(_flat(row))
            n += 1
            if len(group) >= PARQUET_ROWS:
                flush()
        if group or n == 0:
            flush()
    return n

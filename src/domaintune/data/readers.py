"""Read tabular and text files into rows that remember where they came from.

Every row carries its file line (or record number for JSON/Parquet), so that any later error can
point the user at the exact place to fix.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domaintune.errors import DataError

SUPPORTED = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt")


@dataclass
class Row:
    fields: dict[str, Any]
    where: str  # "train.csv:17" (line) or "train.parquet:row 17"


def read_rows(path: str | Path) -> list[Row]:
    """Read ``path`` by its extension (.csv .tsv .jsonl .json .parquet .txt)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}", hint="paths in a recipe are relative to the recipe file")
    suffix = path.suffix.lower()
    readers = {".csv": _read_delimited, ".tsv": _read_delimited, ".jsonl": _read_jsonl,
               ".json": _read_json, ".parquet": _read_parquet, ".txt": _read_txt}
    if suffix not in readers:
        raise DataError(f"unsupported file type {suffix!r}", where=str(path), hint=f"use one of {', '.join(SUPPORTED)}")
    rows = readers[suffix](path)
    if not rows:
        raise DataError("the file has no data rows", where=str(path))
    return rows


def _text(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"bytes {raw[exc.start:exc.start + 4]!r} are not UTF-8",
            where=f"{path}:{line}",
            hint="save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
        ) from None


def _read_delimited(path: Path) -> list[Row]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # newline="" lets csv see quoted line breaks; str.splitlines would also split on U+2028 and the like
    reader = csv.reader(io.StringIO(_text(path), newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return []
    header = [h.strip() for h in header]
    if len(set(header)) != len(header) or any(not h for h in header):
        raise DataError(f"the header row has empty or repeated column names: {header}", where=f"{path}:1")
    rows: list[Row] = []
    start = reader.line_num + 1
    try:
        for values in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not values or all(not v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise DataError(
                    f"row has {len(values)} fields but the header has {len(header)} ({', '.join(header)})",
                    where=where,
                    hint="quote fields that contain the delimiter with double quotes",
                )
            rows.append(Row(dict(zip(header, values)), where))
    except csv.Error as exc:
        raise DataError(f"malformed CSV: {exc}", where=f"{path}:{reader.line_num}") from None
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    # JSON strings may hold U+2028 and other characters that str.splitlines treats as line ends.
    for number, line in enumerate(_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON ({exc.msg} at column {exc.colno})", where=f"{path}:{number}") from None
        if not isinstance(value, dict):
            raise DataError(f"each line must be a JSON object, got {type(value).__name__}", where=f"{path}:{number}")
        rows.append(Row(value, f"{path}:{number}"))
    return rows


def _read_json(path: Path) -> list[Row]:
    text = _text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc.msg})", where=f"{path}:{exc.lineno}") from None
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]}
    if not isinstance(value, list):
        raise DataError("a .json data file must hold a list of objects", where=str(path),
                        hint="or use .jsonl with one object per line")
    rows = []
    for index, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise DataError(f"record {index} is a {type(item).__name__}, expected an object", where=str(path))
        rows.append(Row(item, f"{path}:record {index}"))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"cannot read Parquet: {exc}", where=str(path)) from None
    return [Row(record, f"{path}:row {i}") for i, record in enumerate(table.to_pylist(), start=1)]


def _read_txt(path: Path) -> list[Row]:
    return [
        Row({"text": line.rstrip("\r")}, f"{path}:{number}")
        for number, line in enumerate(_text(path).split("\n"), start=1)
        if line.strip()
    ]

"""Read tabular and text files into rows that remember where they came from.

Every row carries its file line (or record number for JSON/Parquet), so that any later error can
point the user at the exact place to fix. Files are read as streams (``iter_rows``): a row that
cannot be read (bytes that are not UTF-8, a line that is not JSON, a CSV row with the wrong number
of fields) becomes a row with a ``problem`` instead of stopping the file, so that the data
pipeline can skip or quarantine it; ``read_rows`` raises the first problem.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from domaintune.errors import DataError

SUPPORTED = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt")
_NOT_UTF8_HINT = "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
_SURROGATE = re.compile("[\udc80-\udcff]+")  # bytes that were not UTF-8, kept by errors="surrogateescape"


@dataclass
class Row:
    fields: dict[str, Any]
    where: str  # "train.csv:17" (line) or "train.parquet:row 17"
    problem: DataError | None = None  # why this row cannot be used, if it cannot


def read_rows(path: str | Path) -> list[Row]:
    """Read a whole file by its extension (.csv .tsv .jsonl .json .parquet .txt); the first
    unreadable row raises its ``DataError``."""
    rows = []
    for row in iter_rows(path):
        if row.problem is not None:
            raise row.problem
        rows.append(row)
    if not rows:
        raise DataError("the file has no data rows", where=str(path))
    return rows


def iter_rows(path: str | Path) -> Iterator[Row]:
    """Stream the rows of ``path``; problems of the file as a whole (missing, unsupported type,
    bad header) raise, problems of one row are attached to that row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}", hint="paths in a recipe are relative to the recipe file")
    suffix = path.suffix.lower()
    readers = {".csv": _read_delimited, ".tsv": _read_delimited, ".jsonl": _read_jsonl,
               ".json": _read_json, ".parquet": _read_parquet, ".txt": _read_txt}
    if suffix not in readers:
        raise DataError(f"unsupported file type {suffix!r}", where=str(path), hint=f"use one of {', '.join(SUPPORTED)}")
    return readers[suffix](path)


def _not_utf8(raw: bytes, where: str) -> DataError:
    return DataError(f"bytes {raw[:4]!r} are not UTF-8", where=where, hint=_NOT_UTF8_HINT)


def _lines(path: Path) -> Iterator[tuple[int, str | None, bytes]]:
    """(line number, decoded text or None when not UTF-8, raw bytes) for each line. Split on
    b"\\n" only: U+2028 and the like may appear inside JSON strings and text."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            try:
                yield number, raw.decode("utf-8"), raw
            except UnicodeDecodeError as exc:
                yield number, None, raw[exc.start:]


def _read_delimited(path: Path) -> Iterator[Row]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # newline="" lets csv see quoted line breaks; surrogateescape keeps bad bytes for the row to report
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"malformed CSV: {exc}", where=f"{path}:1") from None
        header = [h.strip() for h in header]
        if len(set(header)) != len(header) or any(not h for h in header):
            raise DataError(f"the header row has empty or repeated column names: {header}", where=f"{path}:1")
        if any(_SURROGATE.search(h) for h in header):
            raise _not_utf8(_bad_bytes(" ".join(header)), f"{path}:1")
        start = reader.line_num + 1
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DataError(f"malformed CSV: {exc}", where=f"{path}:{reader.line_num}") from None
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not values or all(not v.strip() for v in values):
                continue
            problem = None
            if any(_SURROGATE.search(v) for v in values):
                problem = _not_utf8(_bad_bytes(" ".join(values)), where)
            elif len(values) != len(header):
                problem = DataError(
                    f"row has {len(values)} fields but the header has {len(header)} ({', '.join(header)})",
                    where=where, hint="quote fields that contain the delimiter with double quotes")
            fields = dict(zip(header, values)) if problem is None else {"_raw": _printable(delimiter.join(values))}
            yield Row(fields, where, problem)


def _printable(text: str) -> str:
    """Bytes that were not UTF-8 shown as U+FFFD, so that the row can be written out again."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _bad_bytes(text: str) -> bytes:
    return _SURROGATE.search(text).group().encode("utf-8", "surrogateescape")


def _read_jsonl(path: Path) -> Iterator[Row]:
    for number, line, raw in _lines(path):
        where = f"{path}:{number}"
        if line is None:
            yield Row({"_raw": raw.decode("utf-8", "replace")}, where, _not_utf8(raw, where))
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Row({"_raw": line}, where, DataError(f"not valid JSON ({exc.msg} at column {exc.colno})", where=where))
            continue
        if not isinstance(value, dict):
            yield Row({"_raw": line}, where,
                      DataError(f"each line must be a JSON object, got {type(value).__name__}", where=where))
            continue
        yield Row(value, where)


def _read_json(path: Path) -> Iterator[Row]:
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise _not_utf8(raw[exc.start:], f"{path}:{line}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc.msg})", where=f"{path}:{exc.lineno}") from None
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]}
    if not isinstance(value, list):
        raise DataError("a .json data file must hold a list of objects", where=str(path),
                        hint="or use .jsonl with one object per line")
    for index, item in enumerate(value, start=1):
        where = f"{path}:record {index}"
        if not isinstance(item, dict):
            yield Row({"_raw": item}, where, DataError(f"record {index} is a {type(item).__name__}, expected an object",
                                                       where=str(path)))
        else:
            yield Row(item, where)


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"cannot read Parquet: {exc}", where=str(path)) from None
    number = 0
    for batch in reader.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            number += 1
            yield Row(record, f"{path}:row {number}")


def _read_txt(path: Path) -> Iterator[Row]:
    for number, line, raw in _lines(path):
        where = f"{path}:{number}"
        if line is None:
            yield Row({"_raw": raw.decode("utf-8", "replace")}, where, _not_utf8(raw, where))
        elif line.strip():
            yield Row({"text": line}, where)

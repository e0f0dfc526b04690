"""Read tabular and text files into rows that remember where they came from.

Every row carries its file line (or record number for JSON/Parquet), so that any later error can
point the user at the exact place to fix. Files are read as streams (``iter_rows``): a row that
cannot be read (bytes that are not UTF-8, a line that is not JSON, a CSV row with the wrong number
of fields) becomes a row with a ``problem`` instead of stopping the file, so that the data
pipeline can skip or quarantine it; ``read_rows`` raises the first problem. A CSV quote that is
never closed raises instead: it swallows the rows after it, so none of them can be trusted.
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
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what splits a file opened with newline="" into lines
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32", "UTF-32 (little-endian)"),
              (codecs.BOM_UTF32_BE, "UTF-32", "UTF-32 (big-endian)"),
              (codecs.BOM_UTF16_LE, "UTF-16", "UTF-16 (little-endian)"),
              (codecs.BOM_UTF16_BE, "UTF-16", "UTF-16 (big-endian)"))
# A quoted CSV field that takes in at least this many following lines, nearly all of which read as
# rows of the file on their own, has lost its closing quote. A real multi-line text rarely has
# the header's number of fields on 9 lines in 10.
_RUNAWAY_LINES = 10
_RUNAWAY_SHARE = 0.9
# ...and once this many rows have gone into one field, stop reading: the field would otherwise
# hold the rest of a file of any size in memory before the error could be raised.
_RUNAWAY_STOP = 1000
_UNCLOSED_QUOTE_HINT = ('end the field with a closing " (a field that starts with " runs until the next "), '
                        'or, if the " belongs to the text, write it as "" inside a quoted field '
                        '(e.g. "a 5"" screen"); the rows after it cannot be read until then')

# Python's csv refuses fields over 128 KiB by default, which would stop a whole file over one long
# document that the same data as JSONL reads fine. The limit is a C long: stay under 2**31 so
# that it holds where a long is 32 bits.
csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))


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
    if suffix != ".parquet":
        _refuse_wide_encoding(path)
    return readers[suffix](path)


def _refuse_wide_encoding(path: Path) -> None:
    """A UTF-16 or UTF-32 file is wrong as a whole (every line of it, not one row), and the
    encoding is known, so the fix can name it."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    found = next(((name, described) for bom, name, described in _WIDE_BOMS if head.startswith(bom)), None)
    if found is None:
        # Without a byte-order mark, ASCII text in UTF-16 has a NUL in every other byte; text in
        # UTF-8 has none at all.
        pairs = len(head) // 2
        even, odd = head[0:2 * pairs:2].count(0), head[1:2 * pairs:2].count(0)
        if pairs >= 2 and odd >= pairs / 2 and even <= pairs / 20:
            found = ("UTF-16LE", "UTF-16 (little-endian, no byte-order mark)")
        elif pairs >= 2 and even >= pairs / 2 and odd <= pairs / 20:
            found = ("UTF-16BE", "UTF-16 (big-endian, no byte-order mark)")
    if found is not None:
        name, described = found
        raise DataError(f"the file is encoded as {described}, not UTF-8", where=str(path),
                        hint=f"save it as UTF-8 (e.g. `iconv -f {name} -t UTF-8 {path.name} > utf8-{path.name}`)")


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


class _RecordLines:
    """The file's lines as the csv reader pulls them, with what the current record took: csv pulls
    a second line for one record only while a quoted field is open, so a record that keeps pulling
    lines that are rows of their own, or that reaches the end of the file, has an unclosed quote."""

    def __init__(self, fh, delimiter: str):
        self._fh = fh
        self._delimiter = delimiter
        self.columns = 0  # the header's, once read; 0 while reading the header
        self.pulled = 0  # lines the current record has taken
        self.rowlike = 0  # of those after its first, how many have `columns` fields on their own
        self.hit_end = False  # the file ended while the record still wanted a line
        self.stopped = False  # fed no more lines to a field that had taken _RUNAWAY_STOP rows

    def new_record(self) -> None:
        self.pulled = self.rowlike = 0
        self.hit_end = self.stopped = False

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.stopped:
            raise StopIteration
        try:
            line = next(self._fh)
        except StopIteration:
            self.hit_end = self.pulled > 0
            raise
        self.pulled += 1
        if self.pulled > 1 and self.columns > 1 and self._is_row(line):
            self.rowlike += 1
            if self.rowlike >= _RUNAWAY_STOP and self.rowlike >= _RUNAWAY_SHARE * (self.pulled - 1):
                self.stopped = True  # csv ends the field here as at the end of a file; the caller raises
        return line

    def _is_row(self, line: str) -> bool:
        return len(next(csv.reader([line], delimiter=self._delimiter), [])) == self.columns

    def runaway(self) -> bool:
        """The record's quoted field did not end where the writer meant it to."""
        following = self.pulled - 1
        return (self.hit_end or self.stopped
                or (self.columns > 1 and following >= _RUNAWAY_LINES and self.rowlike >= _RUNAWAY_SHARE * following))


def _breaks(text: str) -> int:
    return len(_LINE_BREAK.findall(text))


def _unclosed_quote(path: Path, start: int, end: int, values: list[str] | None, lines: _RecordLines) -> DataError:
    """The error for a record whose quoted field ran on, at the line where that field opened."""
    opened = start
    if values:
        # Line breaks are kept inside quoted fields only, so the field with the most of them is
        # the one that ran on (at the end of the file, the last one), and the breaks in the fields
        # before it count the lines from the record's start to its opening quote.
        field = len(values) - 1 if lines.hit_end or lines.stopped else max(
            range(len(values)), key=lambda i: _breaks(values[i]))
        opened = start + sum(_breaks(v) for v in values[:field])
    if lines.hit_end:
        what = f"never closed: the rest of the file (lines {opened}-{end}) was read as one field"
    elif lines.stopped:
        what = (f"not closed within {lines.rowlike} lines that read as rows of their own: lines {opened}-{end} "
                "were read as one field before reading stopped")
    else:
        what = (f"closed only on line {end}: lines {opened}-{end}, {lines.rowlike} of which read as rows "
                "of their own, were read as one field")
    return DataError(f"a quoted field opens on this line and is {what}", where=f"{path}:{opened}",
                     hint=_UNCLOSED_QUOTE_HINT)


def _read_delimited(path: Path) -> Iterator[Row]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # newline="" lets csv see quoted line breaks; surrogateescape keeps bad bytes for the row to report
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        lines = _RecordLines(fh, delimiter)
        reader = csv.reader(lines, delimiter=delimiter)

        def record(start: int) -> list[str] | None:
            """The next record, or None at the end of the file. A quote that runs on raises, however
            data.on_bad_rows is set: where the rows after it start cannot be known."""
            lines.new_record()
            try:
                values = next(reader)
            except StopIteration:
                return None
            except csv.Error as exc:
                if lines.hit_end or lines.stopped:  # other Pythons may raise at the end inside a quote
                    raise _unclosed_quote(path, start, reader.line_num, None, lines) from None
                raise DataError(f"malformed CSV: {exc}", where=f"{path}:{reader.line_num}") from None
            if lines.runaway():
                raise _unclosed_quote(path, start, reader.line_num, values, lines)
            return values

        header = record(1)
        if header is None:
            return
        header = [h.strip() for h in header]
        if len(set(header)) != len(header) or any(not h for h in header):
            raise DataError(f"the header row has empty or repeated column names: {header}", where=f"{path}:1")
        if any(_SURROGATE.search(h) for h in header):
            raise _not_utf8(_bad_bytes(" ".join(header)), f"{path}:1")
        if len(header) == 1 and (other := _other_delimiter(header[0], delimiter)):
            raise _wrong_delimiter(path, header[0], other)
        lines.columns = len(header)
        start = reader.line_num + 1
        while True:
            values = record(start)
            if values is None:
                return
            first, end = start, reader.line_num
            where = f"{path}:{first}"
            start = end + 1
            if not values or all(not v.strip() for v in values):
                continue
            problem = None
            if any(_SURROGATE.search(v) for v in values):
                problem = _not_utf8(_bad_bytes(" ".join(values)), where)
            elif len(values) != len(header):
                hint = "quote fields that contain the delimiter with double quotes"
                if end > first:  # a few rows may have gone into a quoted field, too few to tell for sure
                    hint = (f'a quoted field runs on over lines {first}-{end}: if its closing " is missing, add it, '
                            f'and write a " that belongs to the text as ""; {hint}')
                problem = DataError(
                    f"row has {len(values)} fields but the header has {len(header)} ({', '.join(header)})",
                    where=where, hint=hint)
            fields = dict(zip(header, values)) if problem is None else {"_raw": _printable(delimiter.join(values))}
            yield Row(fields, where, problem)


_DELIMITER_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}


def _other_delimiter(header: str, delimiter: str) -> str | None:
    """The delimiter a one-column header seems to be split by, other than the file's own."""
    counts = {c: header.count(c) for c in _DELIMITER_NAMES if c != delimiter}
    best = max(counts, key=counts.get)
    return best if counts[best] else None


def _wrong_delimiter(path: Path, header: str, other: str) -> DataError:
    """A header read as one column that holds another delimiter: the file is delimited by it, so
    each row is one field (or, when a text holds the file's own delimiter, a wrong number of them)."""
    read_as = "tab" if path.suffix.lower() == ".tsv" else "comma"
    if other in ",\t":  # the other supported delimiter: the file's name is what is wrong
        suffix = ".tsv" if other == "\t" else ".csv"
        fix = f"rename it to {path.stem}{suffix}"
    else:
        fix = (f"there is no delimiter option: convert it to comma-separated .csv or tab-separated .tsv, e.g. "
               f"pandas.read_csv({path.name!r}, sep={other!r}).to_csv({path.stem + '-comma.csv'!r}, index=False)")
    return DataError(f"the header is one column, {header!r}: the file looks {_DELIMITER_NAMES[other]}-delimited "
                     f"({other!r}), but {path.suffix} files are read as {read_as}-delimited", where=f"{path}:1",
                     hint=fix)


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

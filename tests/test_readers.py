"""Tests for domaintune.data.readers: every format, the `where` of each row, and every error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domaintune.data.readers import SUPPORTED, Row, read_rows
from domaintune.errors import DataError, DomaintuneError


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def fields(rows: list[Row]) -> list[dict]:
    return [r.fields for r in rows]


def wheres(rows: list[Row]) -> list[str]:
    return [r.where for r in rows]


# ---------------------------------------------------------------- formats


def test_csv_fields_and_line_numbers(tmp_path):
    p = write(tmp_path / "train.csv", "text,label\nhello,greet\nbye now,leave\n")
    rows = read_rows(p)
    assert fields(rows) == [{"text": "hello", "label": "greet"}, {"text": "bye now", "label": "leave"}]
    assert wheres(rows) == [f"{p}:2", f"{p}:3"]


def test_csv_accepts_str_path_and_strips_header_names(tmp_path):
    p = write(tmp_path / "train.csv", " text , label \na,b\n")
    rows = read_rows(str(p))
    assert fields(rows) == [{"text": "a", "label": "b"}]
    assert rows[0].where == f"{p}:2"


def test_csv_extension_is_case_insensitive(tmp_path):
    p = write(tmp_path / "TRAIN.CSV", "text,label\na,b\n")
    assert fields(read_rows(p)) == [{"text": "a", "label": "b"}]


def test_csv_quoted_newline_keeps_following_line_numbers_right(tmp_path):
    p = write(
        tmp_path / "train.csv",
        'text,label\n"first line\nsecond line",multi\nplain,single\n"a, with comma",x\n',
    )
    rows = read_rows(p)
    assert fields(rows) == [
        {"text": "first line\nsecond line", "label": "multi"},
        {"text": "plain", "label": "single"},
        {"text": "a, with comma", "label": "x"},
    ]
    # The multi-line record starts on line 2 and spans 2-3; the next ones are on 4 and 5.
    assert wheres(rows) == [f"{p}:2", f"{p}:4", f"{p}:5"]


def test_csv_crlf_line_endings_and_quoted_crlf(tmp_path):
    p = tmp_path / "train.csv"
    p.write_bytes(b'text,label\r\n"a\r\nb",x\r\nc,y\r\n')
    rows = read_rows(p)
    assert fields(rows) == [{"text": "a\r\nb", "label": "x"}, {"text": "c", "label": "y"}]
    assert wheres(rows) == [f"{p}:2", f"{p}:4"]


def test_csv_skips_blank_and_all_empty_rows_but_counts_their_lines(tmp_path):
    p = write(tmp_path / "train.csv", "text,label\n\na,x\n , \nc,y\n")
    rows = read_rows(p)
    assert fields(rows) == [{"text": "a", "label": "x"}, {"text": "c", "label": "y"}]
    assert wheres(rows) == [f"{p}:3", f"{p}:5"]


def test_csv_utf8_bom_is_not_part_of_first_column(tmp_path):
    p = tmp_path / "train.csv"
    p.write_bytes(b"\xef\xbb\xbftext,label\ncaf\xc3\xa9,x\n")
    rows = read_rows(p)
    assert fields(rows) == [{"text": "café", "label": "x"}]


def test_tsv_uses_tab_delimiter(tmp_path):
    p = write(tmp_path / "train.tsv", "text\tlabel\nhello, world\tgreet\nx\ty\n")
    rows = read_rows(p)
    assert fields(rows) == [{"text": "hello, world", "label": "greet"}, {"text": "x", "label": "y"}]
    assert wheres(rows) == [f"{p}:2", f"{p}:3"]


def test_jsonl_fields_and_line_numbers_with_blank_line(tmp_path):
    p = write(
        tmp_path / "train.jsonl",
        '{"text": "a", "label": 1}\n\n   \n{"text": "b", "label": 2, "extra": [1, 2]}\n',
    )
    rows = read_rows(p)
    assert fields(rows) == [{"text": "a", "label": 1}, {"text": "b", "label": 2, "extra": [1, 2]}]
    assert wheres(rows) == [f"{p}:1", f"{p}:4"]


def test_json_list_of_objects(tmp_path):
    p = write(tmp_path / "train.json", json.dumps([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]))
    rows = read_rows(p)
    assert fields(rows) == [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    assert wheres(rows) == [f"{p}:record 1", f"{p}:record 2"]


def test_json_data_wrapper_is_unwrapped(tmp_path):
    p = write(tmp_path / "train.json", json.dumps({"data": [{"text": "a"}, {"text": "b"}, {"text": "c"}]}, indent=2))
    rows = read_rows(p)
    assert fields(rows) == [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    assert wheres(rows) == [f"{p}:record 1", f"{p}:record 2", f"{p}:record 3"]


def test_json_object_that_is_not_a_wrapper_is_rejected(tmp_path):
    p = write(tmp_path / "train.json", json.dumps({"text": "a", "label": "b"}))
    with pytest.raises(DataError, match="list of objects") as info:
        read_rows(p)
    assert info.value.where == str(p)
    assert ".jsonl" in info.value.hint


def test_json_record_that_is_not_an_object_is_rejected(tmp_path):
    p = write(tmp_path / "train.json", json.dumps([{"text": "a"}, "oops"]))
    with pytest.raises(DataError, match="record 2 is a str") as info:
        read_rows(p)
    assert info.value.where == str(p)


def test_json_syntax_error_reports_its_line(tmp_path):
    p = write(tmp_path / "train.json", '[\n  {"text": "a"},\n  {"text": oops}\n]\n')
    with pytest.raises(DataError, match="not valid JSON") as info:
        read_rows(p)
    assert info.value.where == f"{p}:3"


def test_parquet_written_with_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "train.parquet"
    table = pa.table({"text": ["a", "b", "c"], "label": [0, 1, 0]})
    pq.write_table(table, p)
    rows = read_rows(p)
    assert fields(rows) == [
        {"text": "a", "label": 0},
        {"text": "b", "label": 1},
        {"text": "c", "label": 0},
    ]
    assert wheres(rows) == [f"{p}:row 1", f"{p}:row 2", f"{p}:row 3"]


def test_damaged_parquet_is_a_data_error(tmp_path):
    p = tmp_path / "train.parquet"
    p.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match="cannot read Parquet") as info:
        read_rows(p)
    assert info.value.where == str(p)


def test_txt_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    p = write(tmp_path / "corpus.txt", "first line\n\n   \nsecond line\nthird\n")
    rows = read_rows(p)
    assert fields(rows) == [{"text": "first line"}, {"text": "second line"}, {"text": "third"}]
    assert wheres(rows) == [f"{p}:1", f"{p}:4", f"{p}:5"]


# ---------------------------------------------------------------- errors


def test_csv_row_with_too_many_fields_points_at_its_line(tmp_path):
    p = write(tmp_path / "train.csv", 'text,label\n"multi\nline",a\nok,b\nhello, world,c\n')
    with pytest.raises(DataError) as info:
        read_rows(p)
    err = info.value
    assert err.where == f"{p}:5"
    assert "3 fields" in err.message and "header has 2" in err.message
    assert "text, label" in err.message
    assert "quote" in err.hint
    assert isinstance(err, DomaintuneError)


def test_csv_row_with_too_few_fields_points_at_its_line(tmp_path):
    p = write(tmp_path / "train.csv", "text,label\na,b\nonly-one\n")
    with pytest.raises(DataError, match="1 fields") as info:
        read_rows(p)
    assert info.value.where == f"{p}:3"


def test_csv_field_over_size_limit_is_a_data_error_with_line(tmp_path):
    p = write(tmp_path / "train.csv", 'text,label\na,b\n"' + "x" * 200_000 + '",c\nd,e\n')
    with pytest.raises(DataError, match="malformed CSV") as info:
        read_rows(p)
    assert info.value.where == f"{p}:3"


def test_jsonl_line_that_is_not_json(tmp_path):
    p = write(tmp_path / "train.jsonl", '{"text": "a"}\n\n{"text": "b",}\n{"text": "c"}\n')
    with pytest.raises(DataError, match="not valid JSON") as info:
        read_rows(p)
    assert info.value.where == f"{p}:3"
    assert "column" in info.value.message


def test_jsonl_line_that_is_a_list(tmp_path):
    p = write(tmp_path / "train.jsonl", '{"text": "a"}\n["text", "b"]\n')
    with pytest.raises(DataError, match="must be a JSON object, got list") as info:
        read_rows(p)
    assert info.value.where == f"{p}:2"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".txt"])
def test_non_utf8_bytes_report_their_line(tmp_path, suffix):
    body = {
        ".csv": b"text,label\na,b\ncaf\xe9,c\n",
        ".jsonl": b'{"text": "a"}\n{"text": "b"}\n{"text": "caf\xe9"}\n',
        ".txt": b"one\ntwo\ncaf\xe9\nfour\n",
    }[suffix]
    p = tmp_path / f"data{suffix}"
    p.write_bytes(body)
    with pytest.raises(DataError, match="not UTF-8") as info:
        read_rows(p)
    assert info.value.where == f"{p}:3"
    assert info.value.where.endswith(":3")
    assert "\\xe9" in info.value.message
    assert "iconv" in info.value.hint


def test_non_utf8_bytes_line_is_right_when_file_has_a_bom(tmp_path):
    p = tmp_path / "data.txt"
    p.write_bytes(b"\xef\xbb\xbfa\nb\n\xffc\n")
    with pytest.raises(DataError) as info:
        read_rows(p)
    assert info.value.where == f"{p}:3"
    assert "\\xff" in info.value.message


def test_jsonl_string_containing_unicode_line_separator(tmp_path):
    p = tmp_path / "train.jsonl"
    lines = [json.dumps({"text": "a\u2028b"}, ensure_ascii=False), json.dumps({"text": "c"})]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = read_rows(p)
    assert fields(rows) == [{"text": "a\u2028b"}, {"text": "c"}]
    assert wheres(rows) == [f"{p}:1", f"{p}:2"]


def test_csv_line_numbers_with_unicode_line_separator_in_field(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text('text,label\n"a\u2028b",x\nc,y\n', encoding="utf-8")
    rows = read_rows(p)
    assert fields(rows) == [{"text": "a\u2028b", "label": "x"}, {"text": "c", "label": "y"}]
    assert wheres(rows) == [f"{p}:2", f"{p}:3"]


def test_missing_file(tmp_path):
    p = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="not found") as info:
        read_rows(p)
    assert str(p) in info.value.message
    assert "relative to the recipe" in info.value.hint


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_rows(tmp_path)


def test_unsupported_extension_lists_supported_ones(tmp_path):
    p = write(tmp_path / "train.xlsx", "whatever")
    with pytest.raises(DataError, match="unsupported file type '.xlsx'") as info:
        read_rows(p)
    assert info.value.where == str(p)
    for ext in (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt"):
        assert ext in info.value.hint
    assert set(SUPPORTED) == {".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt"}


@pytest.mark.parametrize(
    "name, text",
    [
        ("empty.csv", ""),
        ("header_only.csv", "text,label\n"),
        ("blank_rows.csv", "text,label\n\n,\n"),
        ("empty.tsv", ""),
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n  \n\n"),
        ("empty_list.json", "[]"),
        ("empty_wrapper.json", '{"data": []}'),
        ("empty.txt", ""),
        ("blank.txt", "\n   \n\t\n"),
    ],
)
def test_file_without_data_rows(tmp_path, name, text):
    p = write(tmp_path / name, text)
    with pytest.raises(DataError, match="no data rows") as info:
        read_rows(p)
    assert info.value.where == str(p)


def test_empty_json_file_is_a_data_error(tmp_path):
    p = write(tmp_path / "empty.json", "")
    with pytest.raises(DataError, match="not valid JSON"):
        read_rows(p)


@pytest.mark.parametrize("header", ["text,label,text", "text,,label", "text, label ,label"])
def test_header_with_repeated_or_empty_names(tmp_path, header):
    p = write(tmp_path / "train.csv", header + "\na,b,c\n")
    with pytest.raises(DataError, match="empty or repeated column names") as info:
        read_rows(p)
    assert info.value.where == f"{p}:1"


def test_error_string_includes_where_and_hint(tmp_path):
    p = write(tmp_path / "train.jsonl", "[1]\n")
    with pytest.raises(DataError) as info:
        read_rows(p)
    assert str(info.value) == f"{p}:1: each line must be a JSON object, got list"

    p = write(tmp_path / "train.csv", "text,label\na,b,c\n")
    with pytest.raises(DataError) as info:
        read_rows(p)
    text = str(info.value)
    assert text.startswith(f"{p}:2: row has 3 fields")
    assert "\n  fix: quote fields" in text

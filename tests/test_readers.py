"""Tests for domaintune.data.readers: every format, the `where` of each row, and every error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domaintune.data.readers import SUPPORTED, Row, iter_rows, read_rows
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


@pytest.mark.parametrize("delimiter, name", [(";", "semicolon"), ("|", "pipe")])
def test_csv_with_another_delimiter_says_so_and_how_to_convert_it(tmp_path, delimiter, name):
    p = tmp_path / "tickets.csv"
    p.write_text(f"body{delimiter}category\nmy invoice, again{delimiter}billing\nwhere is it{delimiter}shipping\n",
                 encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_rows(p)
    assert info.value.where == f"{p}:1"
    assert info.value.message == (f"the header is one column, 'body{delimiter}category': the file looks "
                                  f"{name}-delimited ({delimiter!r}), but .csv files are read as comma-delimited")
    assert "convert it to comma-separated .csv or tab-separated .tsv" in info.value.hint
    assert f"sep={delimiter!r}" in info.value.hint


def test_tab_separated_file_named_csv_is_told_to_be_renamed(tmp_path):
    p = tmp_path / "tickets.csv"
    p.write_text("body\tcategory\nhello\tbilling\n", encoding="utf-8")
    with pytest.raises(DataError, match="looks tab-delimited") as info:
        read_rows(p)
    assert info.value.hint == "rename it to tickets.tsv"


def test_one_column_csv_is_read(tmp_path):
    p = tmp_path / "notes.csv"
    p.write_text("text\nfirst note; with a semicolon\nsecond | note\n", encoding="utf-8")
    assert [r.fields for r in read_rows(p)] == [{"text": "first note; with a semicolon"}, {"text": "second | note"}]


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


@pytest.mark.parametrize("suffix, quoted", [(".csv", True), (".csv", False), (".tsv", False)])
def test_csv_field_over_the_default_csv_limit_reads_like_jsonl(tmp_path, suffix, quoted):
    # Python's csv stops at 128 KiB per field unless told otherwise.
    sep = "\t" if suffix == ".tsv" else ","
    long = "word " * 400_000  # 2 MB
    text = f'"{long}\nsecond paragraph"' if quoted else long
    p = write(tmp_path / f"train{suffix}", f"text{sep}label\na{sep}b\n{text}{sep}c\nd{sep}e\n")
    rows = read_rows(p)
    assert [r.fields["label"] for r in rows] == ["b", "c", "e"]
    assert rows[1].fields["text"] == (f"{long}\nsecond paragraph" if quoted else long)
    assert wheres(rows) == [f"{p}:2", f"{p}:3", f"{p}:{5 if quoted else 4}"]


# ---------------------------------------------------------------- quotes that are never closed


def _hundred_rows_with_open_quote(path: Path, line: int = 42, sep: str = ",", closing_line: str | None = None) -> Path:
    lines = [f"text{sep}label"]
    for number in range(2, 102):
        if number == line:
            lines.append(f'"I typed 5 inch screen{sep}a')
        elif number == closing_line:
            lines.append(f'he said "hi" there{sep}b')
        else:
            lines.append(f"row {number} text{sep}{'ab'[number % 2]}")
    return write(path, "\n".join(lines) + "\n")


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_quote_never_closed_raises_at_its_line_after_the_rows_before_it(tmp_path, suffix):
    p = _hundred_rows_with_open_quote(tmp_path / f"quote2{suffix}", sep="\t" if suffix == ".tsv" else ",")
    rows = iter_rows(p)
    before = [next(rows) for _ in range(40)]
    assert [r.problem for r in before] == [None] * 40
    assert before[-1].where == f"{p}:41"
    # Not a bad row that data.on_bad_rows: skip could drop: the rows after it are lost.
    with pytest.raises(DataError) as info:
        next(rows)
    err = info.value
    assert err.where == f"{p}:42"
    assert "quoted field" in err.message and "never closed" in err.message
    assert "lines 42-101" in err.message
    assert 'closing "' in err.hint and '""' in err.hint
    with pytest.raises(DataError, match="never closed"):
        read_rows(p)


def test_quote_never_closed_in_a_file_with_no_other_row(tmp_path):
    p = write(tmp_path / "one.csv", 'text,label\n"I typed 5 inch screen,a\n')
    with pytest.raises(DataError, match="never closed") as info:
        read_rows(p)
    assert info.value.where == f"{p}:2"


def test_quote_never_closed_in_the_header(tmp_path):
    p = write(tmp_path / "h.csv", 'text,"label\na,b\nc,d\n')
    with pytest.raises(DataError, match="never closed") as info:
        read_rows(p)
    assert info.value.where == f"{p}:1"


def test_quote_never_closed_names_the_line_it_opened_on_inside_a_multiline_row(tmp_path):
    # The row starts on line 3; its first field is a closed two-line text, its second opens on line 4.
    p = write(tmp_path / "t.csv", 'text,label\nok,x\n"multi\nline","open label\nmore,y\nlast,z\n')
    with pytest.raises(DataError, match="never closed") as info:
        read_rows(p)
    assert info.value.where == f"{p}:4"


def test_quote_closed_many_rows_later_is_not_one_long_row(tmp_path):
    # A stray quote on line 70 closes the field opened on 42, and the merged row even has 2 fields.
    p = _hundred_rows_with_open_quote(tmp_path / "q.csv", closing_line=70)
    with pytest.raises(DataError) as info:
        read_rows(p)
    err = info.value
    assert err.where == f"{p}:42"
    assert "closed only on line 70" in err.message and "lines 42-70, 28 of which" in err.message
    assert '""' in err.hint


def test_quote_that_runs_over_a_huge_file_stops_early(tmp_path):
    body = ["text,label", "ok,a", '"open,b'] + [f"row {i},c" for i in range(50_000)]
    p = write(tmp_path / "big.csv", "\n".join(body) + "\n")
    with pytest.raises(DataError) as info:
        read_rows(p)
    assert info.value.where == f"{p}:3"
    assert "not closed within 1000 lines" in info.value.message
    assert "lines 3-1003" in info.value.message


def test_quote_over_a_few_lines_with_wrong_field_count_hints_at_the_quote(tmp_path):
    p = write(tmp_path / "t.csv", 'text,label\n"oops,a\nb,c\nd"\ne,f\n')
    rows = list(iter_rows(p))
    assert [r.where for r in rows] == [f"{p}:2", f"{p}:5"]
    assert "1 fields but the header has 2" in rows[0].problem.message
    assert "lines 2-4" in rows[0].problem.hint and '""' in rows[0].problem.hint
    assert rows[1].problem is None and rows[1].fields == {"text": "e", "label": "f"}


def test_long_multiline_quoted_texts_are_not_taken_for_an_open_quote(tmp_path):
    letter = "\n".join(["Dear team,", "", "the screen is 5\" wide, not 6.", *[f"point {i}, noted" for i in range(8)],
                        "Thanks, Ann"])
    quoted = '"' + letter.replace('"', '""') + '"'
    p = write(tmp_path / "t.csv", f"text,label\n{quoted},a\nnext,b\n\"two\nlines\",c\nlast,d\n")
    rows = read_rows(p)
    assert [r.fields["text"] for r in rows] == [letter, "next", "two\nlines", "last"]
    n = letter.count("\n")
    assert wheres(rows) == [f"{p}:2", f"{p}:{3 + n}", f"{p}:{4 + n}", f"{p}:{6 + n}"]
    # A one-column file: every line would "look like a row", so only the end of the file tells.
    doc = "\n".join(f"line {i}" for i in range(50))
    p1 = write(tmp_path / "one.csv", f'text\n"{doc}"\nafter\n')
    assert [r.fields["text"] for r in read_rows(p1)] == [doc, "after"]
    assert wheres(read_rows(p1)) == [f"{p1}:2", f"{p1}:52"]


def test_prepare_with_skip_does_not_drop_the_rows_after_an_open_quote(tmp_path):
    import yaml

    from domaintune.data.prepare import prepare
    from domaintune.recipe import load_recipe

    (tmp_path / "data").mkdir()
    _hundred_rows_with_open_quote(tmp_path / "data" / "quote2.csv")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "task": "classification", "base_model": "minilm-l6",
                                      "data": {"train": "data/quote2.csv", "on_bad_rows": "skip"}}))
    with pytest.raises(DataError, match="never closed") as info:
        prepare(load_recipe(recipe), tmp_path)
    assert info.value.where.endswith("quote2.csv:42")


# ---------------------------------------------------------------- encodings


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".txt"])
@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16"), ("utf-16-le", "UTF-16LE"), ("utf-16-be", "UTF-16BE"),
                                            ("utf-32", "UTF-32")])
def test_utf16_file_names_its_encoding_in_the_fix(tmp_path, suffix, encoding, name):
    text = {".csv": "text,label\ncafé,a\nb,c\n", ".tsv": "text\tlabel\nhello\ta\n",
            ".jsonl": '{"text": "a"}\n{"text": "b"}\n', ".json": '[{"text": "a"}]', ".txt": "hello\nworld\n"}[suffix]
    p = tmp_path / f"data{suffix}"
    p.write_bytes(text.encode(encoding))
    with pytest.raises(DataError) as info:
        list(iter_rows(p))
    err = info.value
    assert err.where == str(p)
    assert name.rstrip("LEB") in err.message and "not UTF-8" in err.message
    assert f"iconv -f {name} -t UTF-8" in err.hint
    assert "latin1" not in err.hint


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

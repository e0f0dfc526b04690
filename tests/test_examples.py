"""Tests for domaintune.data.examples: classification, chat (sft) and plain-text examples."""

from __future__ import annotations

import json

import pytest

from domaintune.data.examples import (
    SFT_SHAPES,
    ChatExample,
    TextExample,
    chat_examples,
    classification_examples,
    text_examples,
)
from domaintune.data.readers import Row, read_rows
from domaintune.errors import DataError


def rows_of(*records: dict, path: str = "data/train.jsonl") -> list[Row]:
    return [Row(dict(r), f"{path}:{i}") for i, r in enumerate(records, start=1)]


# ---------------------------------------------------------------- classification


def test_classification_examples_basic():
    rows = rows_of({"text": "  hello  ", "label": "greet"}, {"text": "bye", "label": "leave"})
    out = classification_examples(rows, "text", "label")
    assert out == [
        TextExample(text="hello", label="greet", where="data/train.jsonl:1", meta={}),
        TextExample(text="bye", label="leave", where="data/train.jsonl:2", meta={}),
    ]


def test_classification_custom_fields_and_metadata_kept():
    rows = rows_of(
        {"id": 7, "body": "refund please", "intent": "billing", "source": "email"},
        {"id": 8, "body": "reset password", "intent": "account", "source": "chat"},
    )
    out = classification_examples(rows, "body", "intent")
    assert [e.text for e in out] == ["refund please", "reset password"]
    assert [e.label for e in out] == ["billing", "account"]
    assert out[0].meta == {"id": 7, "source": "email"}
    assert out[1].meta == {"id": 8, "source": "chat"}


def test_classification_labels_become_strings():
    rows = rows_of({"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": True},
                   {"text": "d", "label": 2.5})
    out = classification_examples(rows, "text", "label")
    assert [e.label for e in out] == ["0", "1", "True", "2.5"]
    assert all(isinstance(e.label, str) for e in out)


def test_classification_non_string_text_becomes_string():
    out = classification_examples(rows_of({"text": 12345, "label": "num"}), "text", "label")
    assert out[0].text == "12345"


@pytest.mark.parametrize("missing, key", [("text", "text_field"), ("label", "label_field")])
def test_classification_missing_column(missing, key):
    record = {"text": "a", "label": "b", "other": "c"}
    del record[missing]
    rows = rows_of(record, path="data/train.csv")
    with pytest.raises(DataError) as info:
        classification_examples(rows, "text", "label")
    err = info.value
    assert f"no column {missing!r}" in err.message
    for present in record:
        assert present in err.message
    assert err.where == "data/train.csv"
    assert f"data.{key}" in err.hint


def test_classification_missing_custom_column_names_it():
    rows = rows_of({"sentence": "a", "category": "b"})
    with pytest.raises(DataError) as info:
        classification_examples(rows, "sentence", "intent")
    assert "'intent'" in info.value.message
    assert "sentence, category" in info.value.message
    assert "data.label_field" in info.value.hint


def test_classification_row_missing_field_later_points_at_that_row():
    rows = rows_of({"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c"})
    with pytest.raises(DataError, match="no field 'label'") as info:
        classification_examples(rows, "text", "label")
    assert info.value.where == "data/train.jsonl:3"


@pytest.mark.parametrize("empty", ["", "   ", None, float("nan")])
def test_classification_empty_text_points_at_its_row(empty):
    rows = rows_of({"text": "ok", "label": "x"}, {"text": "fine", "label": "y"}, {"text": empty, "label": "z"})
    with pytest.raises(DataError, match="field 'text' is empty") as info:
        classification_examples(rows, "text", "label")
    assert info.value.where == "data/train.jsonl:3"
    assert info.value.hint


def test_classification_empty_label_points_at_its_row():
    rows = rows_of({"text": "ok", "label": "x"}, {"text": "fine", "label": ""})
    with pytest.raises(DataError, match="field 'label' is empty") as info:
        classification_examples(rows, "text", "label")
    assert info.value.where == "data/train.jsonl:2"


def test_classification_nested_value_is_rejected():
    rows = rows_of({"text": ["a", "b"], "label": "x"})
    with pytest.raises(DataError, match="should be text, got list") as info:
        classification_examples(rows, "text", "label")
    assert info.value.where == "data/train.jsonl:1"


def test_classification_from_csv_file_where_is_file_line(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text('text,label,note\n"two\nlines",a,n1\n,b,n2\n', encoding="utf-8")
    rows = read_rows(p)
    with pytest.raises(DataError, match="field 'text' is empty") as info:
        classification_examples(rows, "text", "label")
    assert info.value.where == f"{p}:4"


def test_classification_missing_column_from_file_names_the_file(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text("sentence,label\na,b\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        classification_examples(read_rows(p), "text", "label")
    assert info.value.where == str(p)
    assert "sentence, label" in info.value.message


# ---------------------------------------------------------------- text


def test_text_examples():
    rows = rows_of({"text": " a doc ", "id": 1}, {"text": "another"})
    out = text_examples(rows, "text")
    assert [e.text for e in out] == ["a doc", "another"]
    assert [e.label for e in out] == [None, None]
    assert [e.where for e in out] == ["data/train.jsonl:1", "data/train.jsonl:2"]


def test_text_examples_custom_field_and_missing_column():
    assert text_examples(rows_of({"body": "x"}), "body")[0].text == "x"
    with pytest.raises(DataError, match="no column 'text'") as info:
        text_examples(rows_of({"body": "x"}), "text")
    assert "body" in info.value.message
    assert "data.text_field" in info.value.hint


def test_text_examples_empty_or_missing_in_later_row():
    rows = rows_of({"text": "x"}, {"other": "y"})
    with pytest.raises(DataError, match="field 'text' is empty") as info:
        text_examples(rows, "text")
    assert info.value.where == "data/train.jsonl:2"


def test_text_examples_from_txt_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("alpha\n\nbeta\n", encoding="utf-8")
    out = text_examples(read_rows(p), "text")
    assert [(e.text, e.where) for e in out] == [("alpha", f"{p}:1"), ("beta", f"{p}:3")]


# ---------------------------------------------------------------- chat


def test_chat_messages_shape():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": " hi "},
        {"role": "assistant", "content": "hello"},
    ]
    out = chat_examples(rows_of({"messages": messages}))
    assert out == [ChatExample(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ],
        where="data/train.jsonl:1",
    )]


def test_chat_messages_extra_keys_are_dropped_and_multi_turn_kept():
    messages = [
        {"role": "user", "content": "q1", "name": "bob"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    out = chat_examples(rows_of({"messages": messages}))[0]
    assert out.messages == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert out.answer == "a2"
    assert out.prompt_messages == out.messages[:-1]


def test_chat_prompt_completion_shape():
    out = chat_examples(rows_of({"prompt": "What is 2+2?", "completion": " 4 "}))[0]
    assert out.messages == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert out.where == "data/train.jsonl:1"


def test_chat_instruction_input_output_shape():
    out = chat_examples(rows_of({"instruction": "Translate", "input": " bonjour ", "output": "hello"}))[0]
    assert out.messages == [
        {"role": "user", "content": "Translate\n\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]


@pytest.mark.parametrize("extra", ["absent", None, "", "   "])
def test_chat_instruction_without_or_with_empty_input(extra):
    record = {"instruction": "Say hi", "output": "hi"}
    if extra != "absent":
        record["input"] = extra
    out = chat_examples(rows_of(record))[0]
    assert out.messages == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]


def test_chat_all_shapes_end_with_assistant_answer():
    rows = rows_of(
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "A1"}]},
        {"prompt": "p", "completion": "A2"},
        {"instruction": "i", "input": "x", "output": "A3"},
        {"instruction": "i", "output": "A4"},
    )
    out = chat_examples(rows)
    assert [e.messages[-1]["role"] for e in out] == ["assistant"] * 4
    assert [e.answer for e in out] == ["A1", "A2", "A3", "A4"]
    assert [e.where for e in out] == [f"data/train.jsonl:{i}" for i in range(1, 5)]


def test_chat_system_prompt_prepended_only_without_system_message():
    rows = rows_of(
        {"prompt": "p", "completion": "c"},
        {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
        {"instruction": "i", "output": "o"},
    )
    out = chat_examples(rows, system_prompt="You are a triage nurse.")
    assert out[0].messages[0] == {"role": "system", "content": "You are a triage nurse."}
    assert len(out[0].messages) == 3
    assert out[1].messages[0] == {"role": "system", "content": "own"}
    assert [m["role"] for m in out[1].messages] == ["system", "user", "assistant"]
    assert out[2].messages[0] == {"role": "system", "content": "You are a triage nurse."}


@pytest.mark.parametrize("system_prompt", [None, ""])
def test_chat_no_system_prompt_adds_nothing(system_prompt):
    out = chat_examples(rows_of({"prompt": "p", "completion": "c"}), system_prompt=system_prompt)[0]
    assert [m["role"] for m in out.messages] == ["user", "assistant"]


def test_chat_prompt_messages_and_answer_properties():
    ex = ChatExample(messages=[
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "the answer"},
    ])
    assert ex.prompt_messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert ex.answer == "the answer"
    # prompt_messages is a copy: changing it leaves the example alone
    ex.prompt_messages.append({"role": "user", "content": "x"})
    assert len(ex.messages) == 3


@pytest.mark.parametrize("record", [
    {"text": "x", "label": "y"},
    {"prompt": "only prompt"},
    {"completion": "only completion"},
    {"instruction": "no output"},
    {"input": "x", "output": "y"},
    {},
])
def test_chat_bad_shape_lists_accepted_shapes(record):
    rows = rows_of({"prompt": "p", "completion": "c"}, record)
    with pytest.raises(DataError) as info:
        chat_examples(rows)
    err = info.value
    assert err.where == "data/train.jsonl:2"
    assert "sft row needs one of" in err.message
    for shape in SFT_SHAPES:
        assert shape in err.message
    assert str(sorted(record)) in err.message


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "u"}, {"role": "bot", "content": "a"}], r"messages\[1\] has unknown role 'bot'"),
    ([{"role": "user", "content": "u"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     r"messages\[1\]: a system message may only come first"),
    ([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "u2"}],
     "last message must be the assistant"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "no user message"),
    ([{"role": "assistant", "content": "a"}], "no user message"),
    ("hello", "must be a non-empty list"),
    ({"role": "user", "content": "u"}, "must be a non-empty list"),
    ([], "must be a non-empty list"),
    (None, "must be a non-empty list"),
    ([{"role": "user"}, {"role": "assistant", "content": "a"}], r"messages\[0\] must be an object with 'role' and 'content'"),
    (["user: hi", {"role": "assistant", "content": "a"}], r"messages\[0\] must be an object"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}], r"'messages\[0\].content' is empty"),
])
def test_chat_bad_messages(messages, match):
    rows = rows_of(
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        {"messages": messages},
    )
    with pytest.raises(DataError, match=match) as info:
        chat_examples(rows)
    assert info.value.where == "data/train.jsonl:2"


@pytest.mark.parametrize("content, kind", [(123, "int"), (2.5, "float"), (True, "bool"), ({"text": "hi"}, "dict"),
                                           ([{"type": "text", "text": "hi"}], "list")])
def test_chat_message_content_that_is_not_a_string_is_a_bad_row(tmp_path, content, kind):
    p = tmp_path / "train.jsonl"
    bad = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "a"}]}
    p.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        chat_examples(read_rows(p))
    assert info.value.message.startswith(f"field 'messages[0].content' should be text, got {kind}")
    assert info.value.where == f"{p}:2"
    assert "as a string" in info.value.hint


def test_chat_last_message_not_assistant_has_hint():
    rows = rows_of({"messages": [{"role": "user", "content": "u"}]})
    with pytest.raises(DataError, match="last message must be the assistant") as info:
        chat_examples(rows)
    assert "assistant" in info.value.hint


def test_chat_unknown_role_lists_roles():
    rows = rows_of({"messages": [{"role": "tool", "content": "t"}, {"role": "assistant", "content": "a"}]})
    with pytest.raises(DataError) as info:
        chat_examples(rows)
    assert "['assistant', 'system', 'user']" in info.value.message


def test_chat_non_hashable_role_is_a_data_error():
    rows = rows_of({"messages": [{"role": ["user"], "content": "u"}, {"role": "assistant", "content": "a"}]})
    with pytest.raises(DataError, match="unknown role") as info:
        chat_examples(rows)
    assert info.value.where == "data/train.jsonl:1"


def test_chat_empty_completion_points_at_row():
    rows = rows_of({"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": None})
    with pytest.raises(DataError, match="field 'completion' is empty") as info:
        chat_examples(rows)
    assert info.value.where == "data/train.jsonl:2"


def test_chat_from_jsonl_file_where_is_line(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text(
        '{"prompt": "p", "completion": "c"}\n\n{"messages": [{"role": "user", "content": "u"}]}\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError, match="last message") as info:
        chat_examples(read_rows(p))
    assert info.value.where == f"{p}:3"


# ---------------------------------------------------------------- audit fixes


def test_classification_integral_float_labels_match_int_labels():
    # pandas writes an integer label column with a gap as floats: 1.0 in Parquet is 1 in the CSV.
    rows = rows_of({"text": "a", "label": 1.0}, {"text": "b", "label": 0.0}, {"text": "c", "label": 1},
                   {"text": "d", "label": 2.5}, {"text": "e", "label": -3.0}, {"text": "f", "label": 1e20})
    out = classification_examples(rows, "text", "label")
    assert [e.label for e in out] == ["1", "0", "1", "2.5", "-3", "100000000000000000000"]


def test_classification_float_label_from_parquet_matches_csv_eval(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    train = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": pa.array([0.0, 1.0, None])}), train)
    evaluation = tmp_path / "eval.csv"
    evaluation.write_text("text,label\nx,0\ny,1\n", encoding="utf-8")
    train_labels = {e.label for e in classification_examples(read_rows(train)[:2], "text", "label")}
    eval_labels = {e.label for e in classification_examples(read_rows(evaluation), "text", "label")}
    assert train_labels == eval_labels == {"0", "1"}


@pytest.mark.parametrize("roles, index, hint", [
    (["assistant", "user", "assistant"], 0, "start the conversation"),
    (["system", "assistant", "user", "assistant"], 1, "start the conversation"),
    (["user", "user", "assistant"], 1, "merge consecutive user messages"),
    (["user", "assistant", "assistant"], 2, "merge consecutive assistant messages"),
    (["system", "user", "assistant", "assistant", "user", "assistant"], 3, "merge consecutive assistant"),
    (["user", "assistant", "user", "user", "assistant"], 3, "merge consecutive user"),
])
def test_chat_messages_out_of_order_are_rejected(roles, index, hint):
    messages = [{"role": role, "content": f"m{i}"} for i, role in enumerate(roles)]
    rows = rows_of({"prompt": "p", "completion": "c"}, {"messages": messages})
    with pytest.raises(DataError) as info:
        chat_examples(rows)
    err = info.value
    assert err.where == "data/train.jsonl:2"
    assert f"messages[{index}] is from {roles[index]!r}" in err.message
    assert "alternate" in err.message
    assert hint in err.hint


@pytest.mark.parametrize("roles", [
    ["system", "user", "assistant"],
    ["user", "assistant", "user", "assistant", "user", "assistant"],
    ["system", "user", "assistant", "user", "assistant"],
])
def test_chat_alternating_messages_are_accepted(roles):
    messages = [{"role": role, "content": f"m{i}"} for i, role in enumerate(roles)]
    assert [m["role"] for m in chat_examples(rows_of({"messages": messages}))[0].messages] == roles


@pytest.mark.parametrize("roles, index", [(["system", "system", "user", "assistant"], 1),
                                          (["user", "assistant", "system", "user", "assistant"], 2),
                                          (["user", "assistant", "system"], 2)])
def test_chat_system_message_after_the_start_is_rejected_with_a_fix(roles, index):
    messages = [{"role": role, "content": f"m{i}"} for i, role in enumerate(roles)]
    with pytest.raises(DataError, match=rf"messages\[{index}\]: a system message may only come first") as info:
        chat_examples(rows_of({"messages": messages}))
    assert "system message at the start" in info.value.hint


@pytest.mark.parametrize("value, kind", [({"a": 1}, "dict"), (["x", "y"], "list")])
def test_chat_structured_input_is_rejected_like_a_structured_prompt(value, kind):
    rows = rows_of({"instruction": "Summarise", "input": value, "output": "o"})
    with pytest.raises(DataError, match=rf"field 'input' should be text, got {kind}") as info:
        chat_examples(rows)
    assert info.value.where == "data/train.jsonl:1"
    assert "string" in info.value.hint
    with pytest.raises(DataError, match=rf"field 'prompt' should be text, got {kind}"):
        chat_examples(rows_of({"prompt": value, "completion": "c"}))


def test_chat_input_that_is_a_number_or_a_gap():
    out = chat_examples(rows_of({"instruction": "Double it", "input": 21, "output": "42"},
                                {"instruction": "Say hi", "input": float("nan"), "output": "hi"}))
    assert out[0].messages[0]["content"] == "Double it\n\n21"
    assert out[1].messages[0]["content"] == "Say hi"

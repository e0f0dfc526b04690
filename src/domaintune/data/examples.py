"""Turn raw rows into the examples each task trains on, checking every row.

Plain data out: classification gives ``TextExample``s, sft gives ``ChatExample``s (OpenAI chat
messages whatever the input shape), pretrain gives ``TextExample``s without labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from domaintune.data.readers import Row
from domaintune.errors import DataError

ROLES = {"system", "user", "assistant"}
SFT_SHAPES = (
    '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}',
    '{"prompt": ..., "completion": ...}',
    '{"instruction": ..., "input": ... (optional), "output": ...}',
)


@dataclass
class TextExample:
    text: str
    label: str | None = None
    where: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChatExample:
    messages: list[dict[str, str]]
    where: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # the row's other fields (for splits and slices)

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """Everything before the final answer: what a model is shown at evaluation."""
        return self.messages[:-1]

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]


def require_columns(rows: list[Row], columns: list[str], recipe_keys: dict[str, str]) -> None:
    """A column missing from the first readable row is the file's problem, not a row's: raise."""
    readable = [row for row in rows if row.problem is None]
    if not readable:
        return
    rows = readable
    present = set(rows[0].fields)
    for column in columns:
        if column not in present:
            key = recipe_keys.get(column)
            hint = f"set data.{key} to one of the columns" if key else "add the column"
            raise DataError(
                f"no column {column!r}; the columns are: {', '.join(map(str, rows[0].fields))}",
                where=rows[0].where.rsplit(":", 1)[0],
                hint=hint,
            )


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # None or NaN


def _string(value: Any, row: Row, name: str) -> str:
    if _missing(value):
        raise DataError(f"field {name!r} is empty", where=row.where, hint="fill it in or remove the row")
    if isinstance(value, (dict, list)):
        raise DataError(f"field {name!r} should be text, got {type(value).__name__}", where=row.where,
                        hint=f"write {name!r} as a string")
    text = str(value).strip()
    if not text:
        raise DataError(f"field {name!r} is empty", where=row.where, hint="fill it in or remove the row")
    return text


def _content(value: Any, row: Row, i: int) -> str:
    """A message's content: JSON gives it with its type, so a number or a boolean is a mistake in
    the data (a lost text), not a value to read as text as a CSV cell is."""
    name = f"messages[{i}].content"
    if not _missing(value) and not isinstance(value, str):
        raise DataError(f"field {name!r} should be text, got {type(value).__name__} {value!r:.40}", where=row.where,
                        hint=f"write {name!r} as a string")
    return _string(value, row, name)


def _label(value: Any, row: Row, name: str) -> str:
    # pandas stores an integer column that has a missing value as floats, so the same label is 1.0
    # in a Parquet file and 1 in a CSV file: both must be the class "1".
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return _string(value, row, name)


def classification_example(row: Row, text_field: str, label_field: str) -> TextExample:
    """One classification row; a bad row raises ``DataError`` naming it."""
    if row.problem is not None:
        raise row.problem
    if text_field not in row.fields or label_field not in row.fields:
        missing = text_field if text_field not in row.fields else label_field
        raise DataError(f"row has no field {missing!r}", where=row.where)
    meta = {k: v for k, v in row.fields.items() if k not in (text_field, label_field)}
    return TextExample(
        text=_string(row.fields[text_field], row, text_field),
        label=_label(row.fields[label_field], row, label_field),
        where=row.where,
        meta=meta,
    )


def text_example(row: Row, text_field: str) -> TextExample:
    """One pretraining row (its text only)."""
    if row.problem is not None:
        raise row.problem
    meta = {k: v for k, v in row.fields.items() if k != text_field}
    return TextExample(text=_string(row.fields.get(text_field), row, text_field), where=row.where, meta=meta)


def chat_example(row: Row, system_prompt: str | None = None) -> ChatExample:
    """One sft row in any of the three shapes, as chat messages ending with the assistant answer."""
    if row.problem is not None:
        raise row.problem
    f = row.fields
    if "messages" in f:
        messages = _check_messages(f["messages"], row)
        shape = {"messages"}
    elif "prompt" in f and "completion" in f:
        messages = [
            {"role": "user", "content": _string(f["prompt"], row, "prompt")},
            {"role": "assistant", "content": _string(f["completion"], row, "completion")},
        ]
        shape = {"prompt", "completion"}
    elif "instruction" in f and "output" in f:
        instruction = _string(f["instruction"], row, "instruction")
        extra = f.get("input")
        # "input" is optional: absent, null, NaN (a Parquet gap) or blank all mean none; anything
        # else must be text like the other fields, not a structure pasted in as its Python repr.
        if _missing(extra) or (isinstance(extra, str) and not extra.strip()):
            user = instruction
        else:
            user = f"{instruction}\n\n{_string(extra, row, 'input')}"
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _string(f["output"], row, "output")},
        ]
        shape = {"instruction", "input", "output"}
    else:
        raise DataError(
            f"row has fields {sorted(f)} but an sft row needs one of: " + "; ".join(SFT_SHAPES),
            where=row.where,
        )
    messages = with_system_prompt(messages, system_prompt)
    meta = {k: v for k, v in f.items() if k not in shape}
    return ChatExample(messages=messages, where=row.where, meta=meta)


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """``messages`` with ``system_prompt`` first when they have no system message of their own:
    what a run trains and evaluates on, and so what its server must answer."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def classification_examples(rows: list[Row], text_field: str, label_field: str) -> list[TextExample]:
    require_columns(rows, [text_field, label_field], {text_field: "text_field", label_field: "label_field"})
    return [classification_example(row, text_field, label_field) for row in rows]


def text_examples(rows: list[Row], text_field: str) -> list[TextExample]:
    require_columns(rows, [text_field], {text_field: "text_field"})
    return [text_example(row, text_field) for row in rows]


def chat_examples(rows: list[Row], system_prompt: str | None = None) -> list[ChatExample]:
    """Accept the three SFT row shapes and return chat messages ending with the assistant answer."""
    return [chat_example(row, system_prompt) for row in rows]


def _check_messages(value: Any, row: Row) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError("'messages' must be a non-empty list of {role, content} objects", where=row.where)
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"messages[{i}] must be an object with 'role' and 'content'", where=row.where)
        role = message["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise DataError(f"messages[{i}] has unknown role {role!r}; expected one of {sorted(ROLES)}", where=row.where)
        if role == "system" and i != 0:
            raise DataError(f"messages[{i}]: a system message may only come first", where=row.where,
                            hint="put the instructions in one system message at the start, or in a user message")
        messages.append({"role": role, "content": _content(message["content"], row, i)})
    if messages[-1]["role"] != "assistant":
        raise DataError("the last message must be the assistant's answer", where=row.where,
                        hint="end each conversation with {'role': 'assistant', 'content': ...}")
    if not any(m["role"] == "user" for m in messages):
        raise DataError("the conversation has no user message", where=row.where)
    # Chat templates (and the loss on assistant turns) assume turns that alternate; some templates
    # raise on anything else, others render it into a prompt the model never sees at serving time.
    first = 1 if messages[0]["role"] == "system" else 0
    for i in range(first, len(messages)):
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if messages[i]["role"] != expected:
            if i == first:
                hint = "start the conversation (after the system message, if any) with the user's message"
            else:
                hint = (f"merge consecutive {messages[i]['role']} messages into one, or add the missing "
                        f"{expected} message between them")
            raise DataError(
                f"messages[{i}] is from {messages[i]['role']!r} where {expected!r} comes next: after an optional "
                "system message, user and assistant messages must alternate, starting with user",
                where=row.where, hint=hint)
    return messages

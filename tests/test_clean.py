"""Tests for domaintune.data.clean.clean_text: each option on and off, idempotence, newlines kept."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from domaintune.data.clean import CleanConfig, clean_text

NOTHING = CleanConfig(unicode_nfc=False, strip_control=False, normalize_whitespace=False, strip_html=False)
EVERYTHING = CleanConfig(strip_html=True)


def only(**option: bool) -> CleanConfig:
    return replace(NOTHING, **option)


def test_with_every_option_off_the_text_is_unchanged():
    text = "  e\u0301 <b>x</b> &amp;\x00\u200b \r\n\n\n\n end\t "
    assert clean_text(text, NOTHING) == text


def test_unicode_nfc_composes_characters():
    assert clean_text("Cafe\u0301 Zu\u0308rich", only(unicode_nfc=True)) == "Café Zürich"
    assert clean_text("Cafe\u0301", only(unicode_nfc=False)) == "Cafe\u0301"
    assert clean_text("ﬁle", only(unicode_nfc=True)) == "ﬁle"  # compatibility forms are kept


def test_strip_control_drops_controls_and_invisible_characters_but_keeps_newline_and_tab():
    text = "\ufeffa\x00b\x07c\x1b[0m\td\u200be\u2060f\u00adg\x9fh\ud800\n"
    assert clean_text(text, only(strip_control=True)) == "abc[0m\tdefgh\n"
    assert clean_text(text, only(strip_control=False)) == text


def test_strip_control_turns_line_break_controls_into_newlines():
    assert clean_text("a\r\nb\rc\x0cd\x85e", only(strip_control=True)) == "a\nb\nc\nd\ne"


def test_strip_control_keeps_joiners_that_spelling_and_emoji_need():
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"
    assert clean_text(family + " " + persian, only(strip_control=True)) == family + " " + persian


def test_normalize_whitespace_collapses_runs_trims_and_keeps_one_blank_line():
    text = "  Hello \t  world\u00a0\u00a0again  \n\n\n\n  \nSecond   line\t\n   "
    assert clean_text(text, only(normalize_whitespace=True)) == "Hello world again\n\nSecond line"
    assert clean_text(text, only(normalize_whitespace=False)) == text


def test_normalize_whitespace_keeps_indentation_inside_the_text():
    answer = "Use a loop:\n\n```python\nfor row in rows:\n    print(row)  \n```"
    assert clean_text(answer, only(normalize_whitespace=True)) == answer.replace("  \n```", "\n```")


def test_normalize_whitespace_treats_unicode_line_separators_as_newlines():
    assert clean_text("one\u2028two\u2029three\r\nfour", only(normalize_whitespace=True)) == "one\ntwo\nthree\nfour"


def test_strip_html_removes_tags_scripts_and_styles_and_decodes_entities():
    html = (
        "<html><head><style>p { color: red }</style></head><body>"
        "<p>Dear&nbsp;team,</p><p>the <b>invoice</b> is &lt;overdue&gt; &amp; unpaid.<br>Thanks</p>"
        "<script>alert('x < y')</script><!-- tracking --></body></html>"
    )
    assert clean_text(html, only(strip_html=True, normalize_whitespace=True)) == (
        "Dear team,\n\nthe invoice is <overdue> & unpaid.\nThanks"
    )
    assert clean_text(html, only(strip_html=False)) == html


def test_strip_html_leaves_plain_text_with_angle_brackets_alone():
    for text in ["if a < b and c > d", "x<y", "Fish & chips", "5 <= 6"]:
        assert clean_text(text, only(strip_html=True)) == text


def test_defaults_clean_a_typical_pasted_ticket():
    ticket = "\ufeff  Hi   support,\r\n\r\n\r\nmy caf\u0065\u0301 order\u200b is late.  \r\n  Thanks!\x00  "
    assert clean_text(ticket) == "Hi support,\n\nmy café order is late.\n  Thanks!"


def test_multiline_chat_answers_keep_their_newlines():
    answer = "Steps:\n1. Open settings\n2. Click *Reset*\n\nDone."
    assert clean_text(answer) == answer
    assert clean_text(answer, EVERYTHING) == answer


def test_empty_and_blank_texts_become_empty():
    assert clean_text("") == ""
    assert clean_text(" \n\t\u200b\r\n ") == ""


NASTY = [
    "e\u200b\u0301",  # removing the zero-width space makes a pair to compose
    "a\u0301\u0301\r\n\r\n\r\n\r\nb",
    " \u00a0\u3000x\t\ty \u2028 z\x0b\x0c",
    "<p>a</p>\n\n<div>b<br/>c</div><style>x</style>",
    "tab\tat\t\tend\t",
    "\U0001f468\u200d\U0001f469 ok",
    "&nbsp;&#8203;&shy; &#233; &unknown; &#1;",
]
CONFIGS = [
    CleanConfig(),
    EVERYTHING,
    NOTHING,
    only(strip_control=True),
    only(normalize_whitespace=True),
    only(unicode_nfc=True, normalize_whitespace=True),
    only(strip_control=True, normalize_whitespace=True),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("text", NASTY)
def test_cleaning_twice_changes_nothing(text: str, config: CleanConfig):
    once = clean_text(text, config)
    assert clean_text(once, config) == once


def random_texts(alphabet: str, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(count)]


@pytest.mark.parametrize("config", [config for config in CONFIGS if not config.strip_html])
def test_cleaning_twice_changes_nothing_on_random_text(config: CleanConfig):
    alphabet = "ab e\n\r\t \u00a0\u3000\u200b\u0301\u0308\x00\x0b\x0c\x1f\x85\u2028\ufeff\u200d"
    for text in random_texts(alphabet, count=500, seed=11):
        once = clean_text(text, config)
        assert clean_text(once, config) == once, repr(text)


def test_cleaning_twice_changes_nothing_on_random_markup():
    # No "&": decoded markup would be taken for tags by a second pass (see the module docstring).
    for text in random_texts("ab p<>/\n \t\u00a0", count=500, seed=13):
        once = clean_text(text, EVERYTHING)
        assert clean_text(once, EVERYTHING) == once, repr(text)

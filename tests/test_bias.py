"""Counterfactual swaps (whole words, both ways, case kept) and the flip rate they measure."""

from __future__ import annotations

import pytest

from domaintune.errors import RecipeError
from domaintune.evaluate.bias import counterfactuals, flip_rate, load_term_groups

GENDER = [("he", "she"), ("him", "her"), ("his", "her"), ("man", "woman"), ("Mr", "Ms")]


def test_both_directions_at_once():
    assert counterfactuals("he told her", GENDER) == "she told him"
    assert counterfactuals("she told him", GENDER) == "he told her"


def test_first_pair_decides_an_ambiguous_term():
    assert counterfactuals("her book", GENDER) == "him book"
    assert counterfactuals("his book", GENDER) == "her book"


def test_case_is_preserved():
    assert counterfactuals("He said HE would call Mr Smith", GENDER) == "She said SHE would call Ms Smith"
    assert counterfactuals("SHE and mr smith", GENDER) == "HE and ms smith"
    assert counterfactuals("Emily met EMILY and emily", [("Emily", "Lakisha")]) == "Lakisha met LAKISHA and lakisha"


def test_whole_words_only():
    assert counterfactuals("the hero reheated the theme", GENDER) is None
    assert counterfactuals("he's the man, the woman's hero", GENDER) == "she's the woman, the man's hero"
    assert counterfactuals("Manchester, woman-owned", GENDER) == "Manchester, man-owned"


def test_nothing_to_swap_is_none():
    assert counterfactuals("the refund was late", GENDER) is None
    assert counterfactuals("he", []) is None


def test_phrases_win_over_the_words_inside_them():
    pairs = [("man", "woman"), ("police man", "police officer")]
    assert counterfactuals("a police man and a man", pairs) == "a police officer and a woman"


def test_shipped_groups():
    groups = load_term_groups()
    assert {"gender", "names", "age"} <= set(groups)
    assert sum(len(pairs) for pairs in groups.values()) >= 30
    for pairs in groups.values():
        assert all(len(pair) == 2 and pair[0].lower() != pair[1].lower() for pair in pairs)
    assert counterfactuals("He thanked his wife", groups["gender"]) == "She thanked her husband"
    assert counterfactuals("Greg called Emily", groups["names"]) == "Jamal called Lakisha"
    assert counterfactuals("the old customer", groups["age"]) == "the young customer"


def test_extra_terms_extend_and_add_groups():
    groups = load_term_groups({"gender": [["actor", "actress"]], "job": [["nurse", "surgeon"]]})
    assert ("actor", "actress") in groups["gender"] and ("he", "she") in groups["gender"]
    assert groups["job"] == [("nurse", "surgeon")]
    assert "job" not in load_term_groups()  # the shipped list is not changed in place


@pytest.mark.parametrize("extra", [{"job": [["nurse"]]}, {"job": [["nurse", "Nurse"]]}, {"job": [["nurse", ""]]},
                                   {"job": "nurse/surgeon"}, {"job": [["nurse", 3]]}])
def test_bad_extra_terms(extra):
    with pytest.raises(RecipeError, match="job"):
        load_term_groups(extra)


def test_flip_rate_with_a_predictor_that_keys_on_a_word():
    calls = []

    def predict(texts: list[str]) -> list[str]:
        calls.append(len(texts))
        return ["escalate" if " she " in f" {t.lower()} " else "routine" for t in texts]

    texts = ["he wants a refund", "she wants a refund", "my order is late", "Greg says he is angry",
             "Emily is happy", "the theme is broken"]
    groups = {"gender": [("he", "she")], "names": [("Greg", "Jamal"), ("Emily", "Lakisha")],
              "age": [("young", "old")]}
    result = flip_rate(predict, texts, groups)
    assert result["gender"]["rows"] == 3 and result["gender"]["flipped"] == 3
    assert result["gender"]["rate"] == 1.0
    assert result["names"] == {"rows": 2, "flipped": 0, "rate": 0.0, "examples": []}
    assert result["age"] == {"rows": 0, "flipped": 0, "rate": None, "examples": []}
    example = result["gender"]["examples"][0]
    assert example == {"text": "he wants a refund", "counterfactual": "she wants a refund",
                       "prediction": "routine", "counterfactual_prediction": "escalate"}
    assert calls == [4, 3, 2]  # originals once (only rows with a swap), then one batch per non-empty group


def test_flip_rate_partial():
    def predict(texts: list[str]) -> list[str]:
        return ["yes" if "Mohammed" in t else "no" for t in texts]

    texts = ["John paid", "John called", "Anna paid", "nobody"]
    result = flip_rate(predict, texts, {"names": [("John", "Mohammed"), ("Anna", "Priya")]})
    assert (result["names"]["rows"], result["names"]["flipped"]) == (3, 2)
    assert result["names"]["rate"] == pytest.approx(2 / 3)


def test_flip_rate_checks_the_predictor():
    with pytest.raises(ValueError, match="predictions"):
        flip_rate(lambda texts: ["x"], ["he", "she"], {"gender": [("he", "she")]})

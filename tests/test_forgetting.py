"""Forgetting: base and tuned on the general-ability set shipped with domaintune."""

from __future__ import annotations

import json

import pytest

from domaintune import run
from domaintune.evaluate.forgetting import answer_correct, general_questions, general_texts, measure_forgetting


def test_the_shipped_set_has_forty_paragraphs_and_forty_answered_questions():
    assert len(general_texts()) == 40 and all(len(t.split()) >= 20 for t in general_texts())
    questions = general_questions()
    assert len(questions) == 40 and len({q["question"] for q in questions}) == 40
    assert all(q["answers"] and all(a.strip() for a in q["answers"]) for q in questions)


@pytest.mark.parametrize("output, answers, expected", [
    ("The capital of France is Paris.", ["Paris"], True),
    ("paris", ["Paris"], True),
    ("A week has 7 days", ["seven", "7"], True),
    ("Comparison is not parity", ["Paris"], False),  # whole words only
    ("It is Lyon.\nParis is the capital.", ["Paris"], False),  # the first line is the answer
    ("", ["Paris"], False),
])
def test_answers_are_matched_as_whole_words_in_the_first_line(output, answers, expected):
    assert answer_correct(output, answers) is expected


def test_an_untouched_adapter_forgets_nothing_and_a_changed_one_shows(tiny_llama):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    never = lambda: pytest.fail("a LoRA model's base is its own weights with the adapter off")  # noqa: E731
    same = measure_forgetting(model, tokenizer, never, items=5)
    assert same["texts"] == same["questions"] == 5
    assert same["tuned"]["perplexity"] == pytest.approx(same["base"]["perplexity"])
    assert same["changed"] == []
    with torch.no_grad():  # LoRA starts with B = 0; any other B changes the model
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1.0)
    changed = measure_forgetting(model, tokenizer, never, items=5)
    assert changed["base"]["perplexity"] == pytest.approx(same["base"]["perplexity"])
    assert changed["tuned"]["perplexity"] != pytest.approx(same["tuned"]["perplexity"])


def test_an_sft_run_reports_forgetting(sft_recipe, tmp_path):
    result = run(sft_recipe, output_dir=tmp_path / "runs", register=False, overrides={"evaluate.forgetting_items": 6})
    forgetting = json.loads((result.run_dir / "metrics.json").read_text())["forgetting"]
    assert forgetting["questions"] == 6
    for model in ("base", "tuned"):
        assert forgetting[model]["perplexity"] > 1 and 0 <= forgetting[model]["qa_accuracy"] <= 1
    assert "Forgetting: general ability" in (result.run_dir / "report.html").read_text()


def test_forgetting_can_be_switched_off(pretrain_recipe, tmp_path):
    result = run(pretrain_recipe, output_dir=tmp_path / "runs", register=False,
                 overrides={"evaluate.forgetting": False, "evaluate.explain_rows": 0})
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert "forgetting" not in metrics and "explanations" not in metrics

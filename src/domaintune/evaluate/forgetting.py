"""Forgetting: what domain tuning cost elsewhere. Base and tuned on a small general-ability set
shipped with domaintune (``general/``): perplexity on 40 paragraphs of everyday English, and 40
general questions with short known answers. A tuned model whose general perplexity rises a lot,
or that stops answering what its base knew, has traded general ability for the domain."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib.resources import files
from typing import Any, Callable

from domaintune.evaluate.metrics import normalize_answer

QUESTION_SUFFIX = " Answer in one or two words."
CHANGED_KEPT = 10  # questions whose verdict changed, kept for the report
# Room for a sentence: chatty models answer "The largest planet in our solar system is Jupiter.",
# and 8 tokens cut that off before the answer. Each answer ends at EOS or with its first line
# (all answer_correct reads), so a batch stops once every answer in it has its line.
ANSWER_TOKENS = 32


@lru_cache(maxsize=1)
def general_texts() -> tuple[str, ...]:
    """The general-text paragraphs (blank-line separated in ``general/text.txt``)."""
    text = files("domaintune.evaluate").joinpath("general/text.txt").read_text(encoding="utf-8")
    return tuple(p.strip() for p in text.split("\n\n") if p.strip())


@lru_cache(maxsize=1)
def general_questions() -> tuple[dict, ...]:
    """The general questions: ``{"question", "answers"}`` with every accepted answer."""
    lines = files("domaintune.evaluate").joinpath("general/questions.jsonl").read_text(encoding="utf-8").splitlines()
    return tuple(json.loads(line) for line in lines if line.strip())


def answer_correct(output: str, answers: list[str]) -> bool:
    """Whether an accepted answer appears as whole words in the output's first line (models
    often answer in a sentence: "The capital of France is Paris.")."""
    first = f" {normalize_answer(output.strip().splitlines()[0] if output.strip() else '')} "
    return any(f" {normalize_answer(a)} " in first for a in answers)


def _question_prompt(tokenizer, question: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question + QUESTION_SUFFIX}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = f"Question: {question}{QUESTION_SUFFIX}\nAnswer:"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _first_line_done(tokenizer, width: int):
    """A stopping criterion that ends each row once its answer has a complete first line."""
    import torch
    from transformers import StoppingCriteria

    class FirstLineDone(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, width:], skip_special_tokens=True)
            return torch.tensor(["\n" in t.lstrip() for t in texts], dtype=torch.bool, device=input_ids.device)

    return FirstLineDone()


def general_ability(model, tokenizer, *, items: int = 40, batch_size: int = 16, max_length: int = 256,
                    max_new_tokens: int = ANSWER_TOKENS, console=None) -> dict[str, Any]:
    """Perplexity on the first ``items`` general texts (each paragraph on its own, truncated to
    ``max_length`` tokens) and the share of the first ``items`` general questions answered
    correctly (greedy)."""
    from rich.console import Console

    from domaintune.train.causal import Tokenized, generate, perplexity

    console = console or Console(stderr=True, quiet=True)
    rows = [Tokenized(ids[:max_length], ids[:max_length])
            for ids in (tokenizer(t, add_special_tokens=False)["input_ids"] for t in general_texts()[:items])]
    ppl, _ = perplexity(model, tokenizer, rows, batch_size)
    questions = general_questions()[:items]
    outputs = generate(model, tokenizer, [_question_prompt(tokenizer, q["question"]) for q in questions],
                       max_new_tokens, batch_size, console, "general questions",
                       stop_when=lambda width: _first_line_done(tokenizer, width))
    correct = [answer_correct(o, q["answers"]) for o, q in zip(outputs, questions)]
    return {"perplexity": float(ppl), "qa_accuracy": sum(correct) / len(correct), "outputs": outputs,
            "correct": correct}


def measure_forgetting(tuned, tokenizer, load_base: Callable[[], Any], *, items: int = 40, batch_size: int = 16,
                       max_length: int = 256, console=None) -> dict[str, Any]:
    """General ability of ``tuned`` and of its base (the adapter switched off, or ``load_base()``)
    on the first ``items`` texts and questions.

    Returns ``{"base": {"perplexity", "qa_accuracy"}, "tuned": {...}, "texts", "questions",
    "changed": [{"question", "base", "tuned", "base_correct", "tuned_correct"}]}``.
    """
    from domaintune.evaluate.run_eval import base_model_of

    kwargs = {"items": items, "batch_size": batch_size, "max_length": max_length, "console": console}
    after = general_ability(tuned, tokenizer, **kwargs)
    with base_model_of(tuned, load_base) as base:
        before = general_ability(base, tokenizer, **kwargs)
    changed = [{"question": q["question"], "base": b, "tuned": t, "base_correct": bc, "tuned_correct": tc}
               for q, b, t, bc, tc in zip(general_questions(), before["outputs"], after["outputs"],
                                          before["correct"], after["correct"]) if bc != tc]
    return {"base": {k: before[k] for k in ("perplexity", "qa_accuracy")},
            "tuned": {k: after[k] for k in ("perplexity", "qa_accuracy")},
            "texts": min(items, len(general_texts())), "questions": min(items, len(general_questions())), "changed": changed[:CHANGED_KEPT]}

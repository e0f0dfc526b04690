"""Why the models answer as they do, on a sample of held-out rows.

* Classification: word occlusion. Each word is dropped in turn and the fall in the predicted
  label's probability is that word's attribution (negative: the word argued against the label).
  Summed over the sample per predicted label, the words that carry each label.
* Generation: per-token log-probabilities of the reference under tuned and base; the tokens where
  they differ most are where tuning changed the model's mind.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Callable

import numpy as np

TOP_WORDS = 8
SHOWN_TOKENS = 64  # per row, for the report


def occlusion(predict_proba: Callable[[list[str]], np.ndarray], texts: list[str], labels: list[str]) -> list[dict]:
    """Attribution of every whitespace-separated word of each text to its predicted label.

    Returns one ``{"text", "prediction", "confidence", "words": [[word, attribution], ...]}`` per
    text; the attribution is p(label | text) − p(label | text without the word)."""
    variants, spans = [], []
    for text in texts:
        words = text.split()
        spans.append((len(variants), len(words)))
        variants += [text] + [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]
    proba = predict_proba(variants) if variants else np.zeros((0, len(labels)))
    explained = []
    for text, (start, count) in zip(texts, spans):
        label = int(proba[start].argmax())
        drops = proba[start, label] - proba[start + 1:start + 1 + count, label]
        explained.append({"text": text, "prediction": labels[label], "confidence": float(proba[start, label]),
                          "words": [[w, float(d)] for w, d in zip(text.split(), drops)]})
    return explained


def indicative_words(explained: list[dict], top: int = TOP_WORDS) -> dict[str, list[list]]:
    """Per predicted label, the words with the largest summed attribution over the sample."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in explained:
        for word, score in row["words"]:
            key = re.sub(r"^\W+|\W+$", "", word.lower())
            if key:
                totals[row["prediction"]][key] += score
    return {label: [[w, s] for w, s in sorted(words.items(), key=lambda item: -item[1])[:top] if s > 0]
            for label, words in sorted(totals.items())}


def explain_classification(predict_proba: Callable[[list[str]], np.ndarray], texts: list[str],
                           labels: list[str]) -> dict[str, Any]:
    """The ``explanations`` section of metrics.json for a classifier."""
    explained = occlusion(predict_proba, texts, labels)
    return {"method": "occlusion", "rows": explained, "indicative": indicative_words(explained)}


def token_logprobs(model, row) -> list[tuple[int, float]]:
    """(token id, log-probability) of each labelled token of ``row`` (a ``Tokenized``) under ``model``."""
    import torch

    from domaintune.train.causal import IGNORE

    ids = torch.tensor([row.input_ids], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logits = logits[0, logits.size(1) - ids.size(1):-1]  # past any virtual tokens prompt tuning puts first
    logprobs = logits.log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0].tolist()
    return [(token, lp) for token, lp, label in zip(row.input_ids[1:], logprobs, row.labels[1:]) if label != IGNORE]


def explain_generation(model, tokenizer, load_base: Callable[[], Any], rows: list, top: int = TOP_WORDS) -> dict[str, Any]:
    """Where tuned and base disagree on reference tokens (``rows``: ``Tokenized`` with labels on
    the reference). Per row the tokens with their log-probability change; over all rows the
    tokens the tuned model favours and disfavours most on average."""
    from domaintune.evaluate.run_eval import base_model_of

    model.eval()
    tuned = [token_logprobs(model, row) for row in rows]
    with base_model_of(model, load_base) as base:
        before = [token_logprobs(base, row) for row in rows]
    explained, by_token = [], defaultdict(list)
    for after, prior in zip(tuned, before):
        tokens = [[tokenizer.decode([t]), a - b] for (t, a), (_, b) in zip(after, prior)]
        for text, change in tokens:
            by_token[text].append(change)
        biggest = sorted(range(len(tokens)), key=lambda i: -abs(tokens[i][1]))[:5]
        explained.append({"tokens": tokens[:SHOWN_TOKENS], "largest": [tokens[i] for i in biggest],
                          "mean_change": float(np.mean([c for _, c in tokens])) if tokens else 0.0})
    means = {token: float(np.mean(changes)) for token, changes in by_token.items() if token.strip()}
    ordered = sorted(means.items(), key=lambda item: item[1])
    return {"method": "token log-probability, tuned − base", "rows": explained,
            "favoured": [[t, c] for t, c in reversed(ordered[-top:]) if c > 0],
            "disfavoured": [[t, c] for t, c in ordered[:top] if c < 0]}

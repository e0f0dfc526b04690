"""Task internals on tiny models: the probe-initialised head, answer-only loss masks, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tokenizer
from domaintune.data.examples import ChatExample
from domaintune.train.batching import length_grouped_batches
from domaintune.train.causal import IGNORE, pack_text, tokenize_chat


def test_head_starts_with_the_probes_predictions(tiny_bert):
    from domaintune import catalog
    from domaintune.train.classification import MeanPoolClassifier, embed_texts, fit_probe, init_head_from_probe

    from conftest import ticket_rows

    base = catalog.resolve(str(tiny_bert))
    tokenizer = catalog.load_tokenizer(base)
    model = MeanPoolClassifier(catalog.load_encoder(base), 4)
    rows = ticket_rows(10)
    labels = sorted({r["label"] for r in rows})
    x = embed_texts(model, tokenizer, [r["text"] for r in rows], 32)
    y = np.array([labels.index(r["label"]) for r in rows])
    probe = fit_probe(x, y, 4, seed=0)
    init_head_from_probe(model, probe)
    model.eval()
    with torch.no_grad():
        head_logits = model.head(torch.tensor(x)).numpy()
    assert (head_logits.argmax(1) == probe.logits(x).argmax(1)).all()
    assert np.allclose(head_logits * 5.0, probe.logits(x), atol=1e-3)


def test_binary_probe_gives_two_logits():
    from domaintune.train.classification import fit_probe

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-1, 1, (20, 3)), rng.normal(1, 1, (20, 3))])
    y = np.array([0] * 20 + [1] * 20)
    probe = fit_probe(x, y, 2, seed=0)
    assert probe.weight.shape == (2, 3)
    assert (probe.logits(x).argmax(1) == y).mean() > 0.9


def _answer_text(tokenizer, tokenized) -> str:
    return tokenizer.decode([t for t, label in zip(tokenized.input_ids, tokenized.labels) if label != IGNORE])


def test_loss_covers_only_the_answers_and_their_end_of_turn():
    tokenizer = make_tokenizer()
    example = ChatExample([
        {"role": "system", "content": "answer"},
        {"role": "user", "content": "what is the colour of sky ?"},
        {"role": "assistant", "content": "blue ."},
        {"role": "user", "content": "what is the colour of snow ?"},
        {"role": "assistant", "content": "white ."},
    ])
    tokenized = tokenize_chat(tokenizer, example, max_length=256)
    kept = _answer_text(tokenizer, tokenized)
    assert kept.split() == ["blue", ".", "<|im_end|>", "white", ".", "<|im_end|>"]
    assert len(tokenized.input_ids) == len(tokenized.labels)


def test_truncation_keeps_ids_and_labels_aligned():
    tokenizer = make_tokenizer()
    example = ChatExample([{"role": "user", "content": "what is the colour of sky ?"},
                           {"role": "assistant", "content": "blue ."}])
    tokenized = tokenize_chat(tokenizer, example, max_length=5)
    assert len(tokenized.input_ids) == len(tokenized.labels) == 5
    assert all(label == IGNORE for label in tokenized.labels)  # the answer was cut off


def test_pretrain_blocks_cover_the_token_stream_in_order():
    tokenizer = make_tokenizer()
    texts = ["my invoice is wrong", "the parcel is broken again", "hello"]
    blocks = pack_text(tokenizer, texts, block=4)
    stream = [t for b in blocks for t in b.input_ids]
    expected = []
    for text in texts:
        expected += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # a final block of one token has nothing to predict and is dropped
    assert stream == expected[:len(stream)] and len(expected) - len(stream) <= 1
    assert all(len(b.input_ids) <= 4 and b.labels == b.input_ids for b in blocks)


@pytest.mark.parametrize("seed", [0, 1])
def test_length_grouped_batches_partition_the_rows(seed):
    lengths = [((i * 37) % 50) + 1 for i in range(203)]
    batches = length_grouped_batches(lengths, batch_size=8, seed=seed, pool=5)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(203))
    assert all(len(b) <= 8 for b in batches)
    # similar lengths inside a batch: far less spread than random batches would have
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    assert spread < 15
    assert batches != length_grouped_batches(lengths, 8, seed + 10, pool=5)

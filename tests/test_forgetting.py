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


SENTENCE = "The largest planet in our solar system is Jupiter."


def _chain_model():
    """A Llama whose next token depends only on the current one, so that after any prompt ending
    in a newline (every chat prompt's generation prompt) it says SENTENCE, a newline, and SENTENCE
    again, for ever: a chatty model answering in a sentence of more than 8 tokens."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from conftest import CHATML

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([SENTENCE + "\n" + SENTENCE] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    chain = tokenizer("\n" + SENTENCE + "\n", add_special_tokens=False)["input_ids"]
    assert len(set(chain[1:])) == len(chain) - 1 > 8 and chain[0] == chain[-1]  # one token per word, newline ends it

    vocab, hidden = len(tokenizer), (len(tokenizer) + 7) // 8 * 8
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    following = dict.fromkeys(range(vocab), tokenizer.eos_token_id) | dict(zip(chain, chain[1:]))
    with torch.no_grad():
        for layer in model.model.layers:  # the layers add nothing: each position sees its own token only
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[torch.arange(vocab), torch.arange(vocab)] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[torch.tensor(list(following.values())), torch.tensor(list(following))] = 1.0
    return model, tokenizer


def test_a_sentence_answer_is_read_to_its_end_and_generation_stops_with_its_line():
    from domaintune.evaluate.forgetting import general_ability

    model, tokenizer = _chain_model()
    questions = general_questions()[:4]
    assert questions[3]["answers"] == ["Jupiter"]
    steps = []
    model.register_forward_hook(lambda *_: steps.append(1))
    result = general_ability(model, tokenizer, items=4)
    assert result["outputs"][3] == SENTENCE  # not cut off at "... solar system is"
    assert result["correct"] == [False, False, False, True]
    generated = len(steps) - 1  # one forward pass scores the general texts
    assert generated == len(tokenizer(SENTENCE + "\n", add_special_tokens=False)["input_ids"])

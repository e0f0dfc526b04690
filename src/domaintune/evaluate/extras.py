"""The metrics.json sections a run adds after training, beyond the base-vs-tuned headline:
explanations for every task; forgetting and the privacy audit for causal LMs. Each is bounded by
the sample sizes in the recipe's ``evaluate`` section."""

from __future__ import annotations

from typing import Any, Callable

from rich.console import Console

from domaintune.recipe import Recipe


def causal_extras(spec: Recipe, model, tokenizer, load_base: Callable[[], Any], train: list, evaluation: list,
                  canaries, console: Console) -> dict[str, Any]:
    """``explanations``, ``bias`` (sft, when ``evaluate.bias_probes``), ``forgetting`` (when
    ``evaluate.forgetting``) and ``privacy`` (when the run planted ``canaries``) for a trained
    causal LM. ``train`` excludes the canaries."""
    from domaintune.train.causal import Tokenized, tokenize_chat

    ev, max_len = spec.evaluate, int(spec.training.max_seq_length)
    extras: dict[str, Any] = {}
    if ev.explain_rows:
        from domaintune.evaluate.explain import explain_generation

        sample = evaluation[:ev.explain_rows]
        if spec.task == "sft":
            rows = [tokenize_chat(tokenizer, e, max_len) for e in sample]
        else:
            rows = [Tokenized(ids[:max_len], ids[:max_len])
                    for ids in (tokenizer(e.text, add_special_tokens=False)["input_ids"] for e in sample)]
        with console.status("explanations: where tuned and base token probabilities differ"):
            extras["explanations"] = explain_generation(model, tokenizer, load_base, rows)
    if spec.task == "sft" and ev.bias_probes:
        with console.status("bias probes: counterfactual swaps in the prompts"):
            extras["bias"] = _generation_flips(spec, model, tokenizer, load_base, train, evaluation)
    if ev.forgetting:
        from domaintune.evaluate.forgetting import measure_forgetting

        with console.status("forgetting: base and tuned on the general-ability set"):
            extras["forgetting"] = measure_forgetting(model, tokenizer, load_base, items=ev.forgetting_items,
                                                      batch_size=ev.batch_size, max_length=max_len)
    if canaries is not None:
        from domaintune.evaluate.privacy import privacy_audit

        with console.status("privacy audit: canary exposure and regurgitation"):
            extras["privacy"] = privacy_audit(model, tokenizer, load_base, spec.task, canaries, train,
                                              candidates=ev.canary_candidates, rows=ev.regurgitation_rows,
                                              tokens=ev.regurgitation_tokens, batch_size=ev.batch_size)
    return extras


def _generation_flips(spec: Recipe, model, tokenizer, load_base: Callable[[], Any], train: list,
                      evaluation: list) -> dict[str, Any]:
    """Counterfactual probes for generation: the terms are swapped in the rendered prompt of up to
    ``evaluate.bias_rows`` held-out rows, and a flip is a different normalised greedy answer."""
    from domaintune.evaluate.bias import flip_rate, load_term_groups
    from domaintune.evaluate.metrics import normalize_answer
    from domaintune.evaluate.run_eval import base_model_of, sft_max_new_tokens
    from domaintune.train.causal import generate, render

    ev = spec.evaluate
    prompts = [render(tokenizer, e.prompt_messages, add_generation_prompt=True) for e in evaluation[:ev.bias_rows]]
    groups = load_term_groups(ev.bias_terms)
    max_new = sft_max_new_tokens(spec, tokenizer, train)
    quiet = Console(quiet=True)

    def answers_of(m) -> Callable[[list[str]], list[str]]:
        def predict(texts: list[str]) -> list[str]:
            ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
            return [normalize_answer(a) for a in generate(m, tokenizer, ids, max_new, ev.batch_size, quiet, "bias")]
        return predict

    tuned = flip_rate(answers_of(model), prompts, groups)
    with base_model_of(model, load_base) as base_model:
        base = flip_rate(answers_of(base_model), prompts, groups)
    return {"base": base, "tuned": tuned}

"""`domaintune export RUN --gguf FILE`: a GGUF file that transformers (and so llama.cpp's format
readers) loads back to the same tokenizer and the same logits as the merged model."""

from __future__ import annotations

import pytest
import torch
import typer
from typer.testing import CliRunner

from domaintune import catalog
from domaintune.cli.export import export
from domaintune.errors import ModelError
from domaintune.pipeline import run
from domaintune.train.export_gguf import write_gguf

from conftest import CHATML, colour_rows

TEXT = "what is the colour of the sky ? blue . <|im_end|>"


def _bpe_tokenizer():
    """A small byte-level BPE tokenizer trained on the test sentences, with ChatML's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [f"{r['prompt']} {r['completion']}" for r in colour_rows()] * 3 + [TEXT]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _bpe_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("bpe-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("dtype, tolerance", [("f32", 1e-5), ("f16", 2e-2), ("q8_0", 6e-2)])
def test_the_gguf_file_loads_back_to_the_same_model(bpe_llama, tmp_path, dtype, tolerance):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = write_gguf(bpe_llama, tmp_path / f"model-{dtype}.gguf", dtype)
    tokenizer = AutoTokenizer.from_pretrained(bpe_llama)
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert loaded_tokenizer(TEXT, add_special_tokens=False)["input_ids"] == ids
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids  # special tokens survive as single tokens
    assert loaded_tokenizer.eos_token == "<|im_end|>"

    original = _logits(AutoModelForCausalLM.from_pretrained(bpe_llama), ids)
    loaded = _logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name), ids)
    assert (loaded - original).abs().max() <= tolerance * original.abs().max()
    if dtype == "q8_0":  # a quarter of the f32 file's weight bytes, and its own error, not f16's
        assert out.stat().st_size < 0.4 * write_gguf(bpe_llama, tmp_path / "f32.gguf", "f32").stat().st_size


def test_models_gguf_cannot_hold_are_refused_before_writing(tiny_llama, tmp_path):
    with pytest.raises(ModelError, match="byte-level BPE"):  # the test Llama's word-level tokenizer
        write_gguf(tiny_llama, tmp_path / "x.gguf")
    with pytest.raises(ModelError, match="f16"):
        write_gguf(tiny_llama, tmp_path / "x.gguf", "q4_k")
    assert not (tmp_path / "x.gguf").exists()


def test_a_gguf_target_that_cannot_be_written_is_refused_before_the_merge(tmp_path, monkeypatch):
    import domaintune.train.export as export_module
    from domaintune.errors import DomaintuneError
    from domaintune.train.export import export_gguf

    monkeypatch.setattr(export_module, "export_merged", lambda *a, **k: pytest.fail("merged before checking"))
    with pytest.raises(DomaintuneError, match="does not exist") as missing:
        export_gguf(tmp_path, tmp_path / "no-such-dir" / "x.gguf")
    assert "mkdir" in str(missing.value.hint)
    with pytest.raises(ModelError, match="unknown GGUF type 'q4_0'"):
        export_gguf(tmp_path, tmp_path / "x.gguf", "q4_0")
    assert not list(tmp_path.iterdir())


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(export)
    app.command("unused")(lambda: None)
    return app


def test_export_gguf_of_a_run_equals_its_merged_export(sft_recipe, bpe_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    system = 'You name colours. Say "blue",\nnot \'sky\'.'
    result = run(sft_recipe, overrides={"base_model": str(bpe_llama), "training.epochs": 1,
                                        "data.system_prompt": system, "training.max_seq_length": 192},
                 output_dir=tmp_path / "runs", register=False)
    gguf_file = tmp_path / "out" / "tuned.gguf"
    gguf_file.parent.mkdir()
    invoked = CliRunner().invoke(_cli(), ["export", str(result.run_dir), "--merged", str(tmp_path / "merged"),
                                          "--gguf", str(gguf_file), "--gguf-type", "f32"])
    assert invoked.exit_code == 0, invoked.output
    assert gguf_file.is_file() and not list(gguf_file.parent.glob(".*partial"))
    ids = AutoTokenizer.from_pretrained(tmp_path / "merged")(TEXT)["input_ids"]
    merged = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids)
    loaded = _logits(AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name), ids)
    torch.testing.assert_close(loaded, merged, rtol=1e-4, atol=1e-4)
    base = _logits(AutoModelForCausalLM.from_pretrained(bpe_llama), ids)
    assert not torch.allclose(base, loaded, atol=1e-3)  # the adapter is in the file, not just the base
    # llama.cpp users who send only a user message get the system prompt every training row had
    user = [{"role": "user", "content": "what is the colour of the sky ?"}]
    trained = AutoTokenizer.from_pretrained(result.run_dir / "adapter").apply_chat_template(
        [{"role": "system", "content": system}, *user], tokenize=False, add_generation_prompt=True)
    from_gguf = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert from_gguf.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == trained

    again = CliRunner().invoke(_cli(), ["export", str(result.run_dir), "--gguf", str(gguf_file)])
    assert again.exit_code == 2 and "exists" in again.output
    nothing = CliRunner().invoke(_cli(), ["export", str(result.run_dir)])
    assert nothing.exit_code == 2 and "--gguf" in nothing.output


@pytest.mark.slow
def test_the_packaged_smollm2_round_trips_through_gguf(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = catalog.resolve("smollm2-135m-instruct")
    folder = catalog.load_causal_lm(base) and base.path  # makes sure the Hugging Face folder exists
    out = write_gguf(folder, tmp_path / "smollm2.gguf", "f16")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert loaded_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == prompt
    assert loaded_tokenizer(prompt, add_special_tokens=False)["input_ids"] == ids
    original = _logits(AutoModelForCausalLM.from_pretrained(folder), ids)
    loaded = _logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name), ids)
    assert (loaded - original).abs().max() <= 2e-2 * original.abs().max()
    assert loaded[-1].argmax() == original[-1].argmax()

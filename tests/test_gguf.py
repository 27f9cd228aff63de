"""GGUF checkpoints (model.gguf_file): a tiny Llama written the way llama.cpp writes one, Q8_0."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import tiny
from conftest import tiny_overrides
from engine.config import ModelConfig
from engine.finetune import finetune
from engine.modeling import load_model, load_tokenizer
from engine.paths import resolve
from engine.recipe_yaml import load_recipe

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    return tiny.make_gguf(tmp_path_factory.mktemp("gguf"))


def test_loads_the_weights_and_tokenizer_written(gguf_model):
    folder, name, written = gguf_model
    cfg = ModelConfig(name_or_path=folder, gguf_file=name)
    tok = load_tokenizer(cfg)
    text = "the movie was really good, and the plot dull"
    assert tok(text)["input_ids"] == tiny.make_bpe_tokenizer()(text)["input_ids"]
    model = load_model(cfg, ["neg", "pos"], tok)
    state = model.state_dict()
    assert set(state) - set(written) == {"score.weight"}  # the new head; every body tensor came from the file
    for key, value in written.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    # unpacked into a plain model: nothing left that would refuse to train or to save
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model.config, "quantization_config", None)


def test_q_and_k_come_back_in_transformers_order(gguf_model):
    """Q8_0 moves each weight by at most half a step of its block's scale; a wrong (or missing)
    un-permutation of Q and K would move whole rows, far more than that."""
    folder, name, written = gguf_model
    model = load_model(ModelConfig(name_or_path=folder, gguf_file=name), ["neg", "pos"])
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        loaded = model.state_dict()[key]
        step = loaded.abs().amax() / 127
        torch.testing.assert_close(loaded, written[key], rtol=0, atol=float(step) / 2 + 1e-7)
        assert (tiny._llama_cpp_permute(loaded, 2) - loaded).abs().amax() > 10 * step


def test_a_home_relative_path_names_the_same_file(gguf_model, tmp_path, monkeypatch):
    """Recipes name the Gemma GGUF as ~/.cache/...: the same text on every machine."""
    folder, name, _ = gguf_model
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".cache").mkdir()
    os.symlink(folder, tmp_path / ".cache" / "tiny")
    assert resolve("~/.cache/tiny") == str(tmp_path / ".cache" / "tiny")
    assert resolve("package-less/relative") == "package-less/relative"
    tok = load_tokenizer(ModelConfig(name_or_path="~/.cache/tiny", gguf_file=name))
    assert tok.pad_token == "<pad>"


@pytest.mark.parametrize("method", ["none", "lora"])
def test_a_gguf_recipe_trains_and_writes_plain_snapshots(gguf_model, tiny_data, tmp_path, method):
    from transformers import AutoModelForSequenceClassification

    folder, name, written = gguf_model
    report = finetune(load_recipe(None, tiny_overrides(folder, tiny_data, tmp_path) + [
        f"model.gguf_file={name}", f"peft.method={method}"]))
    if method == "none":
        assert report["tuned"]["accuracy"] > 0.8 > report["base"]["accuracy"]
    else:  # adapters on a frozen random body learn little; what counts here is export from base/
        assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    base = load_file(tmp_path / "base" / "model.safetensors")
    for key, value in written.items():
        torch.testing.assert_close(base[key], value, rtol=0, atol=0, msg=key)
    for side in ("base", "tuned"):
        config = json.loads((tmp_path / side / "config.json").read_text())
        assert "quantization_config" not in config and config["model_type"] == "llama"
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path / side)
        assert model.config.num_labels == 2
    tuned = load_file(tmp_path / "tuned" / "model.safetensors")
    assert not torch.equal(tuned["score.weight"], base["score.weight"])

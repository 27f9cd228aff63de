"""Decoder LLMs (Llama, Qwen2, Gemma 3, Mistral, Phi-3, GPT-2 shapes) as classifiers: padding, blocks,
checkpointing, training."""
import json

import numpy as np
import pytest
import torch

import tiny
from conftest import tiny_overrides
from engine.batching import Tokenized, collate, model_inputs
from engine.config import ModelConfig
from engine.distributed import transformer_blocks
from engine.finetune import finetune
from engine.modeling import enable_activation_checkpointing, load_model, load_tokenizer
from engine.recipe_yaml import load_recipe

BLOCKS = {"llama": "LlamaDecoderLayer", "qwen2": "Qwen2DecoderLayer", "gemma3": "Gemma3DecoderLayer",
          "mistral": "MistralDecoderLayer", "phi3": "Phi3DecoderLayer", "gpt2": "GPT2Block"}


@pytest.fixture(scope="module", params=tiny.DECODERS)
def decoder(request, tmp_path_factory):
    return request.param, tiny.make_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.mark.parametrize("pad_left", [False, True])
def test_padded_in_a_batch_or_alone_gives_the_same_logits(decoder, pad_left):
    _, path = decoder
    cfg = ModelConfig(name_or_path=path)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, ["neg", "pos"], tok).eval()
    texts = ["bad", "the movie was really good and the plot was fine", "dull"]
    data = Tokenized([np.asarray(tok(t)["input_ids"], np.int32) for t in texts], np.array([0, 1, 0]))
    with torch.no_grad():
        batch = model(**model_inputs(collate(data, np.arange(3), tok.pad_token_id, pad_left), "cpu")).logits
        alone = [model(**model_inputs(collate(data, np.array([i]), tok.pad_token_id, pad_left, multiple_of=1),
                                      "cpu")).logits[0] for i in range(3)]
    for i in range(3):
        torch.testing.assert_close(batch[i], alone[i], rtol=0, atol=1e-5)


def test_a_tokenizer_without_pad_token_gets_one(decoder, tmp_path):
    _, path = decoder
    tok = load_tokenizer(ModelConfig(name_or_path=path))
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    assert again.pad_token is not None
    model = load_model(ModelConfig(name_or_path=path), ["neg", "pos"], again)
    assert model.config.pad_token_id is not None


def test_fsdp_finds_the_decoder_blocks_without_a_list(decoder):
    arch, path = decoder
    model = load_model(ModelConfig(name_or_path=path), ["neg", "pos"])
    names = [type(b).__name__ for b in transformer_blocks(model)]
    assert names.count(BLOCKS[arch]) == 2


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta", *tiny.DECODERS])
def test_activation_checkpointing_gives_the_same_gradients(tmp_path, arch):
    path = tiny.make_model(tmp_path, arch)
    tok = load_tokenizer(ModelConfig(name_or_path=path))
    texts = ["the movie was good", "awful boring plot and a weak story", "fine"]
    data = Tokenized([np.asarray(tok(t)["input_ids"], np.int32) for t in texts], np.array([1, 0, 1]))
    batch = collate(data, np.arange(3), tok.pad_token_id)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = load_model(ModelConfig(name_or_path=path), ["neg", "pos"], tok)
        model.train()
        if checkpointed:
            enable_activation_checkpointing(model)
        loss = torch.nn.functional.cross_entropy(model(**model_inputs(batch, "cpu")).logits, batch["labels"])
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-5, msg=name)


def test_decoder_trains_end_to_end_with_activation_checkpointing(decoder, tiny_data, tmp_path):
    _, path = decoder
    report = finetune(load_recipe(None, tiny_overrides(path, tiny_data, tmp_path) + [
        "train.activation_checkpointing=true"]))
    assert report["tuned"]["accuracy"] > 0.8 > report["base"]["accuracy"]
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["pad_token_id"] is not None

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from engine.config import load_recipe
from engine.finetune import finetune


def _train(tiny_bert, tiny_data, out, *extra):
    recipe = load_recipe(None, tiny_overrides(tiny_bert, tiny_data, out) + list(extra))
    return finetune(recipe)


def test_accumulation_matches_one_big_batch(tiny_bert, tiny_data, tmp_path):
    """grad_accum 4 x batch 2 updates the weights exactly as 1 x batch 8 (loss over all 8 examples)."""
    _train(tiny_bert, tiny_data, tmp_path / "big", "train.batch_size=8", "train.grad_accum=1", "train.max_steps=4")
    _train(tiny_bert, tiny_data, tmp_path / "acc", "train.batch_size=2", "train.grad_accum=4", "train.max_steps=4")
    big = load_file(tmp_path / "big" / "tuned" / "model.safetensors")
    acc = load_file(tmp_path / "acc" / "tuned" / "model.safetensors")
    init = load_file(tmp_path / "big" / "base" / "model.safetensors")
    assert any(not torch.equal(big[k], init[k]) for k in big)  # it did train
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=0, atol=1e-6, msg=k)


def test_fp16_scaler_skips_overflow_steps():
    from engine.precision import Precision
    prec = Precision("fp16", torch.device("cpu"))
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    prec.backward((p * float("inf")).sum())
    prec.unscale(opt)
    assert prec.step(opt) is False
    assert torch.equal(p.detach(), torch.ones(2))  # the overflowing update was not applied
    opt.zero_grad()
    prec.backward(p.sum())
    prec.unscale(opt)
    assert prec.step(opt) is True
    assert not torch.equal(p.detach(), torch.ones(2))


def test_bf16_on_a_gpu_without_bf16_stops_with_one_line(monkeypatch):
    from engine.errors import RecipeError
    from engine.precision import Precision
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(RecipeError, match="Tesla T4 has no bf16 units.*train.precision=fp16 or fp32"):
        Precision("bf16", torch.device("cuda", 0))
    assert Precision("bf16", torch.device("cpu")).dtype == torch.bfloat16  # never refused on a CPU


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tiny_bert, tiny_data, tmp_path, precision):
    report = _train(tiny_bert, tiny_data, tmp_path / precision, f"train.precision={precision}", "train.epochs=4")
    assert report["tuned"]["accuracy"] > report["base"]["accuracy"]
    assert report["train"]["precision"] == precision

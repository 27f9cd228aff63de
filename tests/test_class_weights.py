"""train.class_weights: the loss is torch's weighted mean over the whole global step, whatever the
accumulation or the number of ranks; balanced weights; validation; metrics.json records them."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import run_torchrun, tiny_overrides
from engine import loop
from engine.distributed import Dist
from engine.errors import DataError, RecipeError
from engine.finetune import finetune
from engine.precision import Precision
from engine.recipe_yaml import load_recipe


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.proj(input_ids.float()))


def test_micro_batches_give_the_gradient_of_torchs_weighted_mean():
    torch.manual_seed(1)
    x, y = torch.randint(0, 5, (7, 4)), torch.tensor([0, 1, 2, 2, 2, 1, 2])
    w = torch.tensor([3.0, 1.0, 0.25])  # weight sum 6 over 7 examples
    model, ref = _Linear(), _Linear()
    F.cross_entropy(ref(x, None).logits, y, weight=w).backward()
    micro = [{"input_ids": x[:3], "attention_mask": x[:3], "labels": y[:3]},
             {"input_ids": x[3:], "attention_mask": x[3:], "labels": y[3:]}]
    window = torch.zeros(2, dtype=torch.float64)
    loop.forward_backward(model, micro, Precision("fp32", torch.device("cpu")), Dist(), window, w)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)
    # the logged train loss is the same weighted mean
    assert float(window[0] / window[1]) == pytest.approx(float(F.cross_entropy(ref(x, None).logits, y, weight=w)))


def test_balanced_is_n_over_k_times_class_count():
    weights = loop.loss_weights("balanced", np.array([0, 0, 0, 1, 2, 2]), ["neg", "neu", "pos"])
    np.testing.assert_allclose(weights, [6 / 9, 6 / 3, 6 / 6])
    assert loop.loss_weights("none", np.array([0, 1]), ["a", "b"]) is None
    with pytest.raises(DataError, match="no training example of class pos"):
        loop.loss_weights("balanced", np.array([0, 1, 1]), ["neg", "neu", "pos"])
    with pytest.raises(RecipeError, match="has 2 weights for 3 classes"):
        loop.loss_weights([1.0, 2.0], np.array([0, 1, 2]), ["neg", "neu", "pos"])


@pytest.mark.parametrize("value, message", [
    ("[1, -2]", "positive finite"), ("[1, .inf]", "positive finite"), ("[1, 0]", "positive finite"),
    ("heavy", "none, balanced or a list"), ("[]", "positive finite"), ("[1, true]", "positive finite")])
def test_bad_weights_are_refused_at_load(value, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [f"train.class_weights={value}"])


def _train(model, data, out, *extra):
    return finetune(load_recipe(None, tiny_overrides(model, data, out) + ["train.max_steps=4", *extra]))


def test_weighted_accumulation_matches_one_big_batch_and_is_recorded(tiny_bert, tiny_data, tmp_path):
    weights = "train.class_weights=[1.0, 3.0]"
    report = _train(tiny_bert, tiny_data, tmp_path / "big", "train.batch_size=8", weights)
    _train(tiny_bert, tiny_data, tmp_path / "acc", "train.batch_size=2", "train.grad_accum=4", weights)
    _train(tiny_bert, tiny_data, tmp_path / "plain", "train.batch_size=8")
    big, acc, plain = (load_file(tmp_path / r / "tuned" / "model.safetensors") for r in ("big", "acc", "plain"))
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(big[k], plain[k]) for k in big)  # the weights changed the training
    assert report["train"]["class_weights"] == {"spec": [1.0, 3.0], "weights": {"LABEL_0": 1.0, "LABEL_1": 3.0}}
    saved = json.loads((tmp_path / "big" / "metrics.json").read_text())
    assert saved["train"]["class_weights"]["weights"] == {"LABEL_0": 1.0, "LABEL_1": 3.0}
    assert "class_weights" not in json.loads((tmp_path / "plain" / "metrics.json").read_text())["train"]


def test_ddp_with_weights_matches_one_process(tiny_bert, tiny_data, tmp_path):
    """2 ranks x 4 hold different class mixes each step: the denominator must be the global one."""
    common = ["--recipe", "/dev/null", "train.max_steps=4", "train.class_weights=[1.0, 3.0]"]
    one = tmp_path / "one"
    _train(tiny_bert, tiny_data, one, "train.batch_size=8", "train.class_weights=[1.0, 3.0]")
    two = tmp_path / "two"
    p = run_torchrun(2, *common, *tiny_overrides(tiny_bert, tiny_data, two), "train.batch_size=4",
                     "distributed.strategy=ddp")
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = load_file(one / "tuned" / "model.safetensors"), load_file(two / "tuned" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)

"""The optimizer and the learning-rate schedule (engine/optim.py), and the recipe keys that pick them."""
import itertools
import json
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import tiny_overrides
from engine.config import TrainConfig
from engine.errors import RecipeError
from engine.finetune import finetune
from engine.optim import build_optimizer, build_schedule, lr_schedule
from engine.recipe_yaml import load_recipe


def _lrs(make_schedule, steps: int) -> list[float]:
    """The lr each of `steps` optimizer steps runs with (base lr 1.0)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_schedule(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


def test_no_weight_decay_on_biases_and_layernorm(tiny_bert):
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert all(not (names[i].endswith("bias") or "LayerNorm" in names[i]) for i in decayed)
    assert any("LayerNorm.weight" in names[id(p)] for p in opt.param_groups[1]["params"])


def test_warmup_then_linear_decay():
    lrs = _lrs(lambda opt: lr_schedule(opt, "linear", warmup_steps=4, total_steps=14), 14)
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in itertools.pairwise(lrs[4:]))


def test_default_recipe_keeps_the_linear_schedule_exactly():
    # every recipe written before train.schedule existed must train with the very same lr at every step
    cfg = TrainConfig(warmup_ratio=0.25)
    assert (cfg.schedule, cfg.min_lr_ratio) == ("linear", 0.0)
    total, warmup = 16, 4
    before = [(s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
              for s in range(total)]
    assert _lrs(lambda opt: build_schedule(opt, cfg, total), total) == before


@pytest.mark.parametrize("shape", ["linear", "cosine", "constant"])
def test_schedule_shapes(shape):
    warmup, total, floor = 4, 14, 0.1
    lrs = _lrs(lambda opt: lr_schedule(opt, shape, warmup, total, floor), total)
    for s, lr in enumerate(lrs):
        done = (s - warmup) / (total - warmup)  # share of the decay behind
        want = ((s + 1) / (warmup + 1) if s < warmup else
                {"linear": floor + (1 - floor) * (1 - done),
                 "cosine": floor + (1 - floor) * (1 + math.cos(math.pi * done)) / 2,
                 "constant": 1.0}[shape])
        assert lr == pytest.approx(want, abs=1e-12), (shape, s)
    if shape == "cosine":  # half way down at the middle of the decay, floor * lr never undershot
        assert lrs[9] == pytest.approx(floor + (1 - floor) / 2) and min(lrs) >= floor


def test_recipe_schedule_drives_the_run(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    finetune(load_recipe(None, tiny_overrides(tiny_bert, tiny_data, out) + [
        "train.max_steps=6", "train.log_every=1", "train.schedule=cosine", "train.min_lr_ratio=0.5"]))
    logged = {r["step"]: r["train/lr"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
              if "train/lr" in r}
    # logged after step s: the lr step s + 1 runs with
    want = {s: 3e-3 * (0.5 + 0.5 * (1 + math.cos(math.pi * s / 6)) / 2) for s in range(1, 7)}
    assert logged == pytest.approx(want)


@pytest.mark.parametrize("override, message", [
    ("train.schedule=cosin", "train.schedule"),
    ("train.min_lr_ratio=1.5", "'train.min_lr_ratio' must be in [0, 1]"),
    ("train.min_lr_ratio=-0.1", "'train.min_lr_ratio' must be in [0, 1]"),
])
def test_bad_schedule_keys_stop_with_one_line(tiny_bert, tiny_data, tmp_path, override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, tiny_overrides(tiny_bert, tiny_data, tmp_path) + [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_each_step_runs_with_the_scheduled_lr(tiny_bert, tiny_data, tmp_path):
    """The lr the optimizer applies at each step, and the one log.jsonl reports, follow the warm-up
    then the decay: a scheduler that is never stepped (or stepped twice) trains at the wrong lr."""
    applied = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: applied.append(opt.param_groups[0]["lr"]))
    out = tmp_path / "run"
    try:
        finetune(load_recipe(None, tiny_overrides(tiny_bert, tiny_data, out) + [
            "train.max_steps=8", "train.log_every=1", "train.warmup_ratio=0.25", "train.schedule=linear"]))
    finally:
        hook.remove()
    warmup, total = 2, 8
    want = [3e-3 * ((s + 1) / (warmup + 1) if s < warmup else (total - s) / (total - warmup)) for s in range(total)]
    assert applied == pytest.approx(want)
    logged = [r["train/lr"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "train/lr" in r]
    assert logged == pytest.approx(want[1:] + [0.0])  # logged after step s: the lr step s + 1 runs with

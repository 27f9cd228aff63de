"""Bounded shapes (issue 30): data.pad_buckets pads each batch up to the smallest bucket that holds it,
so a compiled model meets one shape a bucket, for training and for evaluation; train.compile_mode.

The compiled runs here use a recording backend that runs the captured graphs as they are (dynamo
traces, guards and recompiles exactly as it would for inductor, which would add ~40 s of kernel
builds): each graph it is handed is one compile, with the shapes it was compiled for.
"""
import json
import random

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import tiny
from conftest import faults, run_cli, tiny_overrides
from engine import evaluation
from engine.batching import Tokenized, pad_width
from engine.distributed import Dist
from engine.errors import RecipeError
from engine.finetune import finetune
from engine.precision import Precision
from engine.recipe_yaml import load_recipe

BUCKETS = [16, 32, 48, 64]


@pytest.fixture(scope="module")
def varied_data(tmp_path_factory) -> str:
    """Reviews of 1 to 60 words (3 to 62 tokens): without buckets, 8 padded widths."""
    folder = tmp_path_factory.mktemp("varied")
    rng = random.Random(0)
    for split, n in (("train", 192), ("test", 40)):
        labels = [i % 2 for i in range(n)]
        texts = [" ".join([rng.choice(tiny.POSITIVE if y else tiny.NEGATIVE)]
                          + [rng.choice(tiny.FILLER) for _ in range(i * 7 % 60)]) for i, y in enumerate(labels)]
        pd.DataFrame({"text": texts, "label": labels}).to_parquet(folder / f"{split}.parquet")
    return str(folder)


def _args(model, data, out, *extra):
    return [*tiny_overrides(model, data, out), "data.max_length=64", "train.max_steps=12", "train.eval_every=6",
            "train.eval_batch_size=16", "checkpoint.keep=0", *extra]


@pytest.mark.parametrize("value, message", [
    ("[16, 64, 32]", "increasing"), ("[0, 64]", ">= 1"), ("[16, 32]", "ending at data.max_length (64)"),
    ("[16, 16, 64]", "increasing"), ("[]", "increasing"), ("[16, 64.5]", "must be an integer"),
])
def test_bad_buckets_are_refused_at_load(value, message):
    with pytest.raises(RecipeError, match="data.pad_buckets"):
        load_recipe(None, ["data.max_length=64", f"data.pad_buckets={value}"])
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(None, ["data.max_length=64", f"data.pad_buckets={value}"])


def test_compile_mode_is_checked_at_load():
    assert load_recipe(None, ["train.compile=true", "train.compile_mode=reduce-overhead"]).train.compile_mode \
        == "reduce-overhead"
    with pytest.raises(RecipeError, match="'train.compile_mode' must be one of default, reduce-overhead, max-autotune"):
        load_recipe(None, ["train.compile=true", "train.compile_mode=fast"])
    with pytest.raises(RecipeError, match="'train.compile_mode' max-autotune needs train.compile=true"):
        load_recipe(None, ["train.compile_mode=max-autotune"])


def test_a_batch_pads_to_the_smallest_bucket_that_holds_it():
    assert [pad_width(n, buckets=BUCKETS) for n in (1, 16, 17, 33, 48, 49, 64)] == [16, 16, 32, 48, 48, 64, 64]
    assert [pad_width(n) for n in (1, 8, 9, 63)] == [8, 8, 16, 64]  # off: the longest row rounded up to 8


def test_eval_batches_use_the_buckets_and_a_fixed_row_count(monkeypatch):
    """Every eval batch, the last and short one too, has a bucket's width and batch_size rows; the logits
    are the unbucketed ones."""
    shapes = []
    real = evaluation.collate

    def spy(*args, **kwargs):
        batch = real(*args, **kwargs)
        shapes.append(tuple(batch["input_ids"].shape))
        return batch

    monkeypatch.setattr(evaluation, "collate", spy)
    torch.manual_seed(0)
    bag = torch.nn.EmbeddingBag(40, 2, mode="sum")

    class Summed(torch.nn.Module):  # logits from the real tokens only, whatever the padding
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": bag(input_ids, per_sample_weights=attention_mask.float())})

    lengths = [1, 5, 12, 17, 20, 33, 40, 47, 50, 60, 64]  # 11 examples, batches of 4: the last holds 3
    data = Tokenized([np.arange(n) % 39 + 1 for n in lengths], np.zeros(len(lengths), dtype=np.int64))
    dist = Dist()
    plain = evaluation.predict(Summed(), data, 4, Precision("fp32", dist.device), dist, pad_id=0)
    assert (3, 16) in shapes  # without buckets: the last batch is short, its width its own
    shapes.clear()
    bucketed = evaluation.predict(Summed(), data, 4, Precision("fp32", dist.device), dist, pad_id=0, buckets=BUCKETS)
    assert sorted(shapes) == [(4, 16), (4, 48), (4, 64)]
    np.testing.assert_allclose(bucketed, plain, rtol=0, atol=1e-5)


class Recorder:
    """A torch.compile backend that runs each captured graph as it is, keeping (training?, input shapes)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        # the token inputs (input_ids, attention_mask): integer, one row an example; weights and the
        # position/type-id buffers (one row) come in as inputs too
        widths = {t.shape[1] for t in example_inputs if isinstance(t, torch.Tensor) and not t.is_floating_point()
                  and t.dim() == 2 and t.shape[0] > 1}
        self.graphs.append((torch.is_grad_enabled(), widths))
        return gm.forward


@pytest.fixture
def recorded(monkeypatch):
    torch._dynamo.reset()
    rec = Recorder()
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=rec, dynamic=kw.get("dynamic")))
    yield rec
    torch._dynamo.reset()


def test_a_compiled_run_compiles_one_graph_a_bucket_and_trains_as_eager(tiny_bert, varied_data, tmp_path, recorded):
    eager = finetune(load_recipe(None, _args(tiny_bert, varied_data, tmp_path / "eager")))
    compiled = finetune(load_recipe(None, _args(tiny_bert, varied_data, tmp_path / "compiled", "train.compile=true",
                                                f"data.pad_buckets={BUCKETS}")))
    train = [widths for training, widths in recorded.graphs if training]
    evals = [widths for training, widths in recorded.graphs if not training]
    assert 0 < len(train) <= len(BUCKETS) and 0 < len(evals) <= len(BUCKETS), recorded.graphs
    # each graph static, at one bucket's width: no dynamic-shape graph, no width outside the buckets
    assert all(len(w) == 1 and w <= set(BUCKETS) for w in train + evals), recorded.graphs
    assert compiled["train"]["compile_graphs"] == len(recorded.graphs) and compiled["train"]["compile_seconds"] >= 0
    assert "compile_graphs" not in eager["train"]
    # the padding and the compiler change nothing but rounding
    a, b = (load_file(tmp_path / r / "tuned" / "model.safetensors") for r in ("eager", "compiled"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    assert compiled["tuned"]["accuracy"] == eager["tuned"]["accuracy"]
    assert compiled["tuned"]["loss"] == pytest.approx(eager["tuned"]["loss"], abs=1e-5)
    assert compiled["train"]["final_loss"] == pytest.approx(eager["train"]["final_loss"], abs=1e-5)


def test_a_compiled_bucketed_run_resumes_exactly(tiny_bert, varied_data, tmp_path):
    def run(out, *extra, env):  # two buckets and evals at 6 and 10 only: fewer graphs to compile per run
        return run_cli("launch/train.py", "--recipe", "/dev/null",
                       *_args(tiny_bert, varied_data, out, "train.compile=true", "data.pad_buckets=[32, 64]",
                              "checkpoint.keep=2", "checkpoint.every=5", "train.max_steps=10"), *extra, env=env)

    p = run(tmp_path / "whole", env=faults(compile_backend="eager"))
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "resumed"
    assert run(out, env=faults(compile_backend="eager", kill_at_step=8)).returncode != 0
    p = run(out, "--resume", "auto", env=faults(compile_backend="eager"))
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (load_file(tmp_path / r / "tuned" / "model.safetensors") for r in ("whole", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("whole", "resumed"))
    assert [e["loss"] for e in ma["evals"]] == [e["loss"] for e in mb["evals"]]
    assert mb["train"]["resumed_from"].endswith("step-5")

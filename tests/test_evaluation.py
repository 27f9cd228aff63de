"""Evaluation scores every example exactly once (and says so loudly when the sharding does not), without
autograd, in the run's precision."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine import evaluation, modeling
from engine.batching import Tokenized
from engine.config import ModelConfig
from engine.distributed import Dist
from engine.evaluation import predict
from engine.precision import Precision


class _ScoreIsFirstToken(torch.nn.Module):
    """Logits [0, first token id]: each example's score is traceable to its row."""

    def forward(self, input_ids, attention_mask=None, **_):
        first = input_ids[:, :1].float()
        return SimpleNamespace(logits=torch.cat([torch.zeros_like(first), first], dim=1))


def _data(n=11):
    return Tokenized(ids=[np.array([i + 1] * (1 + i % 4), dtype=np.int32) for i in range(n)],
                     labels=np.ones(n, dtype=np.int64))


def _predict(data):
    dist = Dist()
    return evaluation.predict(_ScoreIsFirstToken(), data, 3, Precision("fp32", dist.device), dist, pad_id=0)


def test_predict_returns_each_example_in_dataset_order():
    data = _data()
    assert _predict(data)[:, 1].tolist() == [float(i + 1) for i in range(len(data))]


@pytest.mark.parametrize("broken", [
    lambda batches: batches[:-1],  # a batch lost: its examples would score as class 0
    lambda batches: [np.concatenate([batches[0], batches[1][:1]])] + batches[1:],  # one example twice
])
def test_a_gap_or_double_count_in_the_shards_is_an_error(monkeypatch, broken):
    real = evaluation.eval_batches
    monkeypatch.setattr(evaluation, "eval_batches", lambda *a, **kw: broken(real(*a, **kw)))
    with pytest.raises(RuntimeError, match="evaluation sharding"):
        _predict(_data())


def test_predict_builds_no_graph(tiny_bert):
    model = modeling.load_model(ModelConfig(name_or_path=tiny_bert), ["neg", "pos"]).train()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(
        (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"))))
    data = Tokenized([np.array([1, 7, 8, 2], np.int32), np.array([1, 9, 2], np.int32)], np.array([0, 1]))
    logits = predict(model, data, 2, Precision("bf16", torch.device("cpu")), Dist(), pad_id=0)
    assert logits.shape == (2, 2) and np.isfinite(logits).all()
    assert seen == [(False, True, True)]
    assert model.training  # left as found


def test_fsdp_evaluates_under_no_grad_not_inference_mode():
    # FSDP2's forward writes to its all-gathered parameters, which inference mode forbids
    with Dist(strategy="fsdp").no_autograd():
        assert not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    with Dist(strategy="ddp").no_autograd():
        assert torch.is_inference_mode_enabled()


def test_a_stored_score_from_an_older_format_is_scored_again(tmp_path):
    # a base score stored before classification_metrics had accuracy_se would lack it: score again
    import json
    dist = SimpleNamespace(is_main=True, broadcast_object=lambda x: x)
    calls = []

    def score():
        calls.append(1)
        return {"accuracy": 0.5, "accuracy_se": 0.1, "n": 25}

    key = {"base": "abc"}
    first, reused = evaluation.cached_score(key, score, dist, tmp_path)
    assert (calls, reused) == ([1], False)
    again, reused = evaluation.cached_score(key, score, dist, tmp_path)
    assert (calls, reused, again) == ([1], True, first)
    (stored,) = tmp_path.glob("*.json")
    old = json.loads(stored.read_text())
    del old["format"]
    del old["metrics"]["accuracy_se"]
    stored.write_text(json.dumps(old))
    rescored, reused = evaluation.cached_score(key, score, dist, tmp_path)
    assert (calls, reused, rescored["accuracy_se"]) == ([1, 1], False, 0.1)


def test_the_eval_set_digest_sees_token_ids_and_labels():
    """A stored base score is reused only for the very same examples and labels."""
    data = _data()
    digest = evaluation.eval_set_digest(data)
    relabelled = Tokenized(data.ids, 1 - data.labels)
    retokenized = Tokenized([data.ids[0][:-1]] + data.ids[1:], data.labels)
    assert len({digest, evaluation.eval_set_digest(relabelled), evaluation.eval_set_digest(retokenized)}) == 3
    assert evaluation.eval_set_digest(_data()) == digest

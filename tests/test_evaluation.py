"""Evaluation scores every example exactly once, and says so loudly when the sharding does not."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine import evaluation
from engine.data import Tokenized
from engine.distributed import Dist
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

"""Evaluation runs without autograd, in the run's precision."""
import numpy as np
import torch

from engine import modeling
from engine.config import ModelConfig
from engine.data import Tokenized
from engine.distributed import Dist
from engine.evaluation import no_autograd, predict
from engine.precision import Precision


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
    with no_autograd("fsdp"):
        assert not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    with no_autograd("ddp"):
        assert torch.is_inference_mode_enabled()

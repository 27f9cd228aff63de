"""peft.method=head: only the classification head trains; the body in tuned/ is base/'s bit for bit;
the same on 2 DDP processes as on one."""
import json

import pytest
import torch
from safetensors.torch import load_file

import tiny
from conftest import run_cli, run_torchrun, tiny_overrides
from engine import adapters


def _args(model, data, out, *extra):
    return ["--recipe", "/dev/null", *tiny_overrides(model, data, out), "peft.method=head", "train.max_steps=8",
            "train.lr=1e-2", *extra]


def _check_head_only(out, head):
    base, tuned = load_file(out / "base" / "model.safetensors"), load_file(out / "tuned" / "model.safetensors")
    assert set(base) == set(tuned)
    body = [k for k in base if k.split(".", 1)[0] not in head]
    trained = [k for k in base if k.split(".", 1)[0] in head]
    assert body and trained
    for k in body:
        assert torch.equal(tuned[k], base[k]), k  # the body did not move, not even by rounding
    assert all(not torch.equal(tuned[k], base[k]) for k in trained)  # every head tensor trained
    report = json.loads((out / "metrics.json").read_text())
    assert report["peft"] == {"method": "head"} and not (out / "adapter").exists()
    assert report["params"]["trainable_params"] == sum(tuned[k].numel() for k in trained)
    return tuned


@pytest.fixture(scope="module")
def one_process(tiny_bert, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("head1")
    p = run_cli("launch/train.py", *_args(tiny_bert, tiny_data, out, "train.batch_size=8"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "head: " in p.stdout and "parameters trained" in p.stdout
    return out


def test_only_the_head_trains(one_process):
    _check_head_only(one_process, ["classifier"])


def test_ddp_two_processes_train_the_same_head(one_process, tiny_bert, tiny_data, tmp_path):
    p = run_torchrun(2, *_args(tiny_bert, tiny_data, tmp_path, "train.batch_size=4", "distributed.strategy=ddp"))
    assert p.returncode == 0, p.stderr[-3000:]
    two = _check_head_only(tmp_path, ["classifier"])
    one = load_file(one_process / "tuned" / "model.safetensors")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("arch, head", [("bert", {"classifier"}), ("distilbert", {"pre_classifier", "classifier"}),
                                        ("roberta", {"classifier"})])
def test_the_head_is_what_lora_trains_whole(tmp_path, arch, head):
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(tiny.make_model(tmp_path, arch))
    frozen = adapters.freeze_body(model)
    assert {n.split(".", 1)[0] for n, p in frozen.named_parameters() if p.requires_grad} == head
    assert set(adapters.head_modules(model)) == head  # LoRA's modules_to_save

"""Exact resume for DDP and FSDP on 2 processes, and torchrun's elastic restart."""
import json

import pytest

from conftest import faults, run_torchrun
from test_resume import args as one_process_args
from test_resume import same_run


def args(model, data, out, strategy, *extra):
    return one_process_args(model, data, out, "train.batch_size=4", f"distributed.strategy={strategy}",
                            *extra)[1:]  # torchrun adds launch/train.py itself


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sigkill_then_resume_is_bit_identical(tiny_bert_dropout, tiny_data, tmp_path, strategy):
    ref, out = tmp_path / "ref", tmp_path / "run"
    p = run_torchrun(2, *args(tiny_bert_dropout, tiny_data, ref, strategy))
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_torchrun(2, *args(tiny_bert_dropout, tiny_data, out, strategy), env=faults(kill_at_step=13, rank=0))
    assert p.returncode != 0 and not (out / "metrics.json").exists()
    step10 = out / "checkpoints" / "step-10"
    shards = sorted(f.name for f in step10.glob("shard-*"))
    assert shards == (["shard-0.safetensors", "shard-1.safetensors"] if strategy == "fsdp" else ["shard-0.safetensors"])
    p = run_torchrun(2, *args(tiny_bert_dropout, tiny_data, out, strategy), "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    same_run(ref, out)


def test_elastic_restart_resumes_from_the_latest_checkpoint(tiny_bert_dropout, tiny_data, tmp_path):
    out = tmp_path / "run"
    p = run_torchrun(2, *args(tiny_bert_dropout, tiny_data, out, "ddp"), "--resume", "auto",
                     env=faults(kill_at_step=13, rank=1), extra=["--max-restarts=1"])
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["train"]["resumed_from"].endswith("step-10")
    assert m["train"]["steps"] == 48

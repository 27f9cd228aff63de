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


def test_sigterm_to_torchrun_in_the_final_scoring_stops_in_one_line_and_the_resume_finishes(tiny_bert, tiny_data,
                                                                                           tmp_path):
    out = tmp_path / "run"
    split = ["data.eval_split=null", "data.holdout_size=32", "data.test_split=test"]
    # rank 0's 3rd model load is tuned/'s, scored on test after training: it signals torchrun then,
    # and torchrun passes SIGTERM on to both ranks
    p = run_torchrun(2, *args(tiny_bert, tiny_data, out, "ddp", *split), env=faults(term_parent_at_load=3, rank=0))
    assert p.returncode != 0 and not (out / "metrics.json").exists()
    stops = [line for line in p.stderr.splitlines() if line.startswith("stopped: ")]
    assert stops == [f"stopped: stopped by a signal after training, in the final scoring; the last checkpoint is "
                     f"{out}/checkpoints/step-40; continue with: --resume auto"], p.stderr[-3000:]
    # the ranks' own exits are that line: the only traceback is torchrun's own, of the signal it got
    assert p.stderr.count("Traceback") == p.stderr.count("SignalException: Process"), p.stderr[-3000:]
    p = run_torchrun(2, *args(tiny_bert, tiny_data, out, "ddp", *split), "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    t = json.loads((out / "metrics.json").read_text())["train"]
    assert (t["steps"], t["steps_timed"], t["samples_per_s"]) == (40, 0, None)

"""Reliability on one process: exact resume after SIGKILL, kills during saves, signals, NaN, refusals."""
import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import faults, run_cli, tiny_overrides


def args(model, data, out, *extra):
    # 192 examples / batch 8: 24 steps an epoch, 2 epochs; checkpoints every 5 steps and at epoch ends
    return ["launch/train.py", "--recipe", "/dev/null", *tiny_overrides(model, data, out), "train.epochs=2",
            "checkpoint.every=5", "checkpoint.keep=2", "train.log_every=1", "train.eval_every=0", *extra]


def same_run(a, b):
    wa, wb = load_file(a / "tuned" / "model.safetensors"), load_file(b / "tuned" / "model.safetensors")
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"
    ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
    for side in ("base", "tuned"):
        assert ma[side]["accuracy"] == mb[side]["accuracy"] and ma[side]["loss"] == mb[side]["loss"]
    assert [e["accuracy"] for e in ma["evals"]] == [e["accuracy"] for e in mb["evals"]]


@pytest.fixture(scope="module")
def reference(tiny_bert_dropout, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out))
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_sigkill_mid_epoch_then_resume_is_bit_identical(reference, tiny_bert_dropout, tiny_data, tmp_path):
    out = tmp_path / "run"
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out), env=faults(kill_at_step=13))
    assert p.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists() and not (out / "tuned").exists()
    steps = sorted(d.name for d in (out / "checkpoints").iterdir() if d.name.startswith("step-"))
    assert steps == ["step-10", "step-5"]
    again = run_cli(*args(tiny_bert_dropout, tiny_data, out), "--resume", "auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout + again.stderr
    same_run(reference, out)
    assert json.loads((out / "metrics.json").read_text())["train"]["resumed_from"].endswith("step-10")


def test_kill_during_a_save_keeps_the_previous_checkpoint(reference, tiny_bert_dropout, tiny_data, tmp_path):
    out = tmp_path / "run"
    # writes: base/ (1), step-5 (2), step-10 (3): die half-way through step-10
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out), env=faults(kill_in_save=3))
    assert p.returncode == -signal.SIGKILL
    ckpts = out / "checkpoints"
    assert (ckpts / "step-5" / "state.json").exists() and not (ckpts / "step-10").exists()
    assert any(d.name.startswith(".step-10.tmp-") for d in ckpts.iterdir())  # the half-written one
    again = run_cli(*args(tiny_bert_dropout, tiny_data, out), "--resume", "auto")
    assert again.returncode == 0, again.stderr[-3000:]
    same_run(reference, out)
    assert not any(d.name.startswith(".") for d in ckpts.iterdir())  # debris cleared by the next save


def test_sigterm_checkpoints_and_says_how_to_resume(reference, tiny_bert_dropout, tiny_data, tmp_path):
    out = tmp_path / "run"
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out), env=faults(term_at_step=8))
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("stopped: stopped by a signal at step 8;") and "--resume auto" in last
    assert (out / "checkpoints" / "step-8" / "state.json").exists()
    assert not (out / "metrics.json").exists()
    again = run_cli(*args(tiny_bert_dropout, tiny_data, out), "--resume", "auto")
    assert again.returncode == 0, again.stderr[-3000:]
    same_run(reference, out)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_bert_dropout, tiny_data, tmp_path):
    out = tmp_path / "run"
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out), env=faults(nan_at_step=7))
    assert p.returncode == 1
    assert "step 7: loss or gradients are not finite" in p.stderr
    assert (out / "checkpoints" / "step-5").exists() and not (out / "metrics.json").exists()


def test_fp16_scaler_skips_the_nan_step_and_finishes(tiny_bert_dropout, tiny_data, tmp_path):
    out = tmp_path / "run"
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out, "train.precision=fp16"), env=faults(nan_at_step=7))
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["train"]["skipped_steps"] >= 1


def test_refusals(reference, tiny_bert_dropout, tiny_data, tmp_path):
    # a finished run is not overwritten by accident
    p = run_cli(*args(tiny_bert_dropout, tiny_data, reference))
    assert p.returncode == 2 and "holds a finished run" in p.stderr
    # an unfinished run is neither restarted over nor resumed silently
    out = tmp_path / "run"
    assert run_cli(*args(tiny_bert_dropout, tiny_data, out), env=faults(kill_at_step=13)).returncode != 0
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out))
    assert p.returncode == 2 and "holds checkpoints of an unfinished run" in p.stderr
    # a checkpoint of another recipe shape
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out, "train.batch_size=4"), "--resume", "auto")
    assert p.returncode == 2
    assert p.stderr.strip().endswith("written by a different run (batch_size was 8, now 4)")
    # a truncated checkpoint file
    shard = out / "checkpoints" / "step-10" / "shard-0.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out), "--resume", "auto")
    assert p.returncode == 2 and f"{shard}: corrupt or truncated" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    # --overwrite starts over cleanly
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out), "--overwrite")
    assert p.returncode == 0, p.stderr[-2000:]


def test_truncated_model_weights_are_a_clean_error(tiny_bert, tiny_data, tmp_path):
    import shutil
    broken = tmp_path / "model"
    shutil.copytree(tiny_bert, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    p = run_cli(*args(str(broken), tiny_data, tmp_path / "out"))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "cannot load model" in p.stderr

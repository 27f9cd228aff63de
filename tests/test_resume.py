"""Reliability on one process: exact resume after SIGKILL, kills during saves, signals, NaN, refusals."""
import json
import shutil
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
    assert p.stderr.strip().endswith("train.batch_size was 8 when this checkpoint was written, now 4; "
                                     "it may not change on resume (set it back, or start over with --overwrite)")
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


def _logged_steps(out):
    return [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()
            if "train/loss" in json.loads(x)]


def test_a_crash_in_the_final_scoring_leaves_nothing_that_looks_finished(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    # selected on a holdout, reported on test: base/ and tuned/ are scored once more at the end;
    # no checkpoints, so nothing refuses a re-run but the run's own remains
    split = ["data.eval_split=null", "data.holdout_size=32", "data.test_split=test", "checkpoint.keep=0"]
    # model loads: the model (1), base/ to score on test (2), tuned/ to score on test (3): die in the 3rd
    p = run_cli(*args(tiny_bert, tiny_data, out, *split), env=faults(kill_at_load=3))
    assert p.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    assert not (out / "tuned").exists()  # written, not yet scored: it must not look like a result
    log = (out / "log.jsonl").read_text()
    # a re-run does not append to the unfinished run's log: it says how to start over
    p = run_cli(*args(tiny_bert, tiny_data, out, *split))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "holds an unfinished run" in p.stderr and "--overwrite" in p.stderr
    assert (out / "log.jsonl").read_text() == log
    # --resume auto with no checkpoint to continue from starts clean (as an elastic restart does)
    p = run_cli(*args(tiny_bert, tiny_data, out, *split), "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    steps = json.loads((out / "metrics.json").read_text())["train"]["steps"]
    assert _logged_steps(out) == list(range(1, steps + 1))  # each step logged once: the dead attempt's log is gone
    assert (out / "tuned" / "model.safetensors").exists() and not (out / ".unfinished").exists()


def test_best_weights_are_those_of_the_state_resumed(tiny_bert_dropout, tiny_data, tmp_path):
    from engine.config import DataConfig
    from engine.evaluation import evaluate_pretrained

    out = tmp_path / "run"
    best = ["train.keep_best=true", "train.eval_every=1", "checkpoint.keep=3"]
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out, *best), env=faults(kill_at_step=19))
    assert p.returncode == -signal.SIGKILL
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    acc = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    # the premise: the lost attempt found a new best after its last checkpoint (step 15)
    assert max(acc[s] for s in (16, 17, 18)) > max(acc[s] for s in range(1, 16))
    # resume from step 15 without evals, and stop at once: best.safetensors must be step 15's best
    # (a resume's first optimizer.step() is the one with lr 0 that creates Adam's state to load into)
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out, best[0], "train.eval_every=0", best[2]),
                "--resume", "auto", env=faults(term_at_step=2))
    assert p.returncode == 1 and "stopped by a signal at step 16" in p.stderr
    kept = json.loads((out / "checkpoints" / "step-16" / "state.json").read_text())["loop"]["best"]
    assert kept["step"] <= 15
    # score the kept weights: base/'s files with best.safetensors as its weights
    folder = tmp_path / "best"
    shutil.copytree(out / "base", folder)
    shutil.copyfile(out / "checkpoints" / "best.safetensors", folder / "model.safetensors")
    alone = evaluate_pretrained(str(folder), DataConfig(source=tiny_data, max_length=32), "test")
    assert alone["accuracy"] == kept["accuracy"] and alone["loss"] == pytest.approx(kept["loss"], abs=1e-6)
    assert (out / "checkpoints" / "step-16" / "best.safetensors").exists()  # the checkpoint carries them


def test_resuming_an_older_checkpoint_drops_the_abandoned_newer_ones(reference, tiny_bert_dropout, tiny_data,
                                                                      tmp_path):
    out = tmp_path / "run"
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out), env=faults(kill_at_step=13))
    assert p.returncode == -signal.SIGKILL  # leaves step-5 and step-10
    # go back to step 5, stop after two steps (the 1st optimizer.step() creates Adam's state to load
    # into): step-7 is this attempt's newest
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out), "--resume", str(out / "checkpoints" / "step-5"),
                env=faults(term_at_step=3))
    assert p.returncode == 1 and "stopped by a signal at step 7" in p.stderr
    assert sorted(d.name for d in (out / "checkpoints").iterdir() if d.name.startswith("step-")) == \
        ["step-5", "step-7"]
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out), "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["train"]["resumed_from"].endswith("step-7")
    same_run(reference, out)

"""train.early_stopping_patience and train.select_metric: when a run stops, what it keeps, and that a
resumed run counts its patience on from the checkpoint."""
import json
import signal

import pytest

from conftest import faults, run_cli, tiny_overrides
from engine.errors import RecipeError
from engine.finetune import finetune
from engine.recipe_yaml import load_recipe

# tiny data at this lr: eval accuracy reaches 1.0 at epoch 2 and cannot improve after it, while the
# eval loss keeps falling for all 10 epochs
TEN_EPOCHS = ["train.epochs=10", "train.keep_best=true"]


def _run(model, data, out, *extra):
    return finetune(load_recipe(None, tiny_overrides(model, data, out) + TEN_EPOCHS + list(extra)))


def test_patience_2_stops_two_evals_after_dev_stops_improving(tiny_bert, tiny_data, tmp_path):
    report = _run(tiny_bert, tiny_data, tmp_path, "train.early_stopping_patience=2")
    accs = [e["accuracy"] for e in report["evals"]]
    first_best = accs.index(max(accs))
    assert len(accs) == first_best + 3 < 10  # the best, then two evals without improvement, then stop
    assert report["train"]["stopped_early"] is True and report["train"]["steps"] == report["evals"][-1]["step"]
    assert report["tuned"]["step"] == report["evals"][first_best]["step"]  # keep_best: the first best


def test_loss_is_lower_is_better_and_selects_for_keep_best(tiny_bert, tiny_data, tmp_path):
    report = _run(tiny_bert, tiny_data, tmp_path, "train.early_stopping_patience=2", "train.select_metric=loss")
    losses = [e["loss"] for e in report["evals"]]
    assert len(losses) == 10 and report["train"]["stopped_early"] is False  # the loss kept falling
    best = min(report["evals"], key=lambda e: e["loss"])
    # accuracy (the old hard-coded choice) would have kept epoch 2's weights
    assert report["tuned"]["step"] == best["step"] == report["evals"][-1]["step"]
    assert report["train"]["select_metric"] == "loss"


def test_patience_needs_keep_best_and_is_not_negative():
    with pytest.raises(RecipeError, match="needs train.keep_best=true"):
        load_recipe(None, ["train.early_stopping_patience=2"])
    with pytest.raises(RecipeError, match="'train.early_stopping_patience' must be >= 0"):
        load_recipe(None, ["train.early_stopping_patience=-1", "train.keep_best=true"])
    with pytest.raises(RecipeError, match="'train.select_metric' must be one of accuracy, f1, loss"):
        load_recipe(None, ["train.select_metric=recall"])


def test_a_run_killed_mid_patience_resumes_the_count(tiny_bert, tiny_data, tmp_path):
    """Killed after one eval without improvement: the resumed run stops where the uninterrupted one did.
    A counter reset on resume would train one epoch longer; a lost `best` three epochs longer."""
    reference = _run(tiny_bert, tiny_data, tmp_path / "ref", "train.early_stopping_patience=2")
    steps_per_epoch = reference["train"]["steps_per_epoch"]
    stop_step = reference["evals"][-1]["step"]
    kill_at = stop_step - steps_per_epoch + 8  # inside the last epoch: the checkpoint has 1 stale eval
    args = ["launch/train.py", "--recipe", "/dev/null", *tiny_overrides(tiny_bert, tiny_data, tmp_path / "run"),
            *TEN_EPOCHS, "train.early_stopping_patience=2"]
    p = run_cli(*args, env=faults(kill_at_step=kill_at))
    assert p.returncode == -signal.SIGKILL
    latest = max((tmp_path / "run" / "checkpoints").glob("step-*"), key=lambda d: int(d.name[5:]))
    state = json.loads((latest / "state.json").read_text())
    assert state["loop"]["stale_evals"] == 1
    p = run_cli(*args, "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert resumed["train"]["resumed_from"]
    assert [e["step"] for e in resumed["evals"]] == [e["step"] for e in reference["evals"]]
    assert resumed["train"]["stopped_early"] is True and resumed["tuned"]["step"] == reference["tuned"]["step"]

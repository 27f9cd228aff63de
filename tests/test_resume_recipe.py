"""A resumed run trains the recipe it records, end to end on the tiny model: a key that may not change
is refused before any work, more epochs extend the run (the lr schedule rebuilt, and said), the
record says what ran, throughput covers the steps this process timed, and a signal after training
stops in one line. Every key's decision is checked in-process in tests/test_resume_keys.py."""
import json
import shutil

import pytest

from conftest import faults, run_cli
from engine.errors import CheckpointError
from engine.finetune import finetune
from engine.recipe_yaml import load_recipe
from test_resume import args

LABELS = "data.label_names=[neg,pos]"


@pytest.fixture(scope="module")
def stopped(tiny_bert_dropout, tiny_data, tmp_path_factory):
    """A 48-step run stopped by SIGTERM at step 8 (checkpoints step-5 and step-8)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out, LABELS), env=faults(term_at_step=8))
    assert p.returncode == 1 and (out / "checkpoints" / "step-8" / "state.json").exists(), p.stderr[-3000:]
    return out


def _files(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_changed_key_that_may_not_change_is_refused_before_any_work(stopped, tiny_bert_dropout, tiny_data,
                                                                      tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    before = _files(out)
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out, LABELS, "train.lr=1e-3"), "--resume", "auto")
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines() == [
        f"error: {out}/checkpoints/step-8: train.lr was 0.003 when this checkpoint was written, now 0.001; "
        f"it may not change on resume (set it back, or start over with --overwrite)"]
    # the same through finetune(), for the keys whose change used to train silently another recipe
    for change, named in (("data.label_names=[pos,neg]", "data.label_names was ['neg', 'pos']"),
                          ("train.group_by_length=false", "train.group_by_length was True"),
                          ("train.weight_decay=0.1", "train.weight_decay was 0.01"),
                          ("train.keep_best=true", "train.keep_best was False")):  # used to crash after all steps
        recipe = load_recipe(None, args(tiny_bert_dropout, tiny_data, out, LABELS, change)[3:])
        with pytest.raises(CheckpointError, match=named.replace("[", r"\[")):
            finetune(recipe, resume="auto")
    assert _files(out) == before  # recipe.yaml still says what ran; nothing else written either


def test_more_epochs_extend_the_run_and_its_record_says_so(stopped, tiny_bert_dropout, tiny_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out, LABELS, "train.epochs=3"), "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    said = p.stdout + p.stderr
    assert "resume: train.epochs 2.0 -> 3.0" in said
    # no silent lr jump: the schedule now spans 72 steps, and the log says what the next step's lr becomes
    assert (f"the lr schedule is rebuilt over 72 steps: the lr of step 9 is {3e-3 * 64 / 72:.4g} "
            f"(the 48-step schedule's was {3e-3 * 40 / 48:.4g})") in said
    assert "train:" in said and "over the 64 steps timed" in said and "(resumed at step 8 of 72)" in said
    assert load_recipe(out / "recipe.yaml").train.epochs == 3.0  # what ran
    m = json.loads((out / "metrics.json").read_text())["train"]
    assert (m["steps"], m["resumed_at_step"], m["steps_timed"]) == (72, 8, 64) and m["samples_per_s"] > 0
    # the run was copied to another folder, which may change too (the checkpoint is in it)
    assert m["resume_changes"] == {"output_dir": [str(stopped), str(out)], "train.epochs": [2.0, 3.0]}
    # the finished run goes on only to train longer
    again = args(tiny_bert_dropout, tiny_data, out, LABELS, "train.epochs=3")
    p = run_cli(*again, "--resume", "auto")
    assert p.returncode == 2 and "holds a finished run (metrics.json); --resume continues a finished run only " \
        "to train it longer" in p.stderr
    report = finetune(load_recipe(None, args(tiny_bert_dropout, tiny_data, out, LABELS, "train.epochs=4")[3:]),
                      resume="auto")
    t = report["train"]
    assert (t["steps"], t["resumed_at_step"], t["steps_timed"]) == (96, 72, 24)
    assert json.loads((out / "metrics.json").read_text())["tuned"]["step"] == 96


def test_a_signal_in_the_final_scoring_stops_in_one_line_and_the_resume_finishes(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    # selected on a holdout, reported on test: base/ and tuned/ are loaded again and scored at the end
    split = ["data.eval_split=null", "data.holdout_size=32", "data.test_split=test"]
    # model loads: the model (1), base/ to score on test (2), tuned/ to score on test (3)
    p = run_cli(*args(tiny_bert, tiny_data, out, *split), env=faults(term_at_load=3))
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last == (f"stopped: stopped by a signal after training, in the final scoring; the last checkpoint is "
                    f"{out}/checkpoints/step-40; continue with: --resume auto")
    assert not (out / "metrics.json").exists() and not (out / "tuned").exists()
    p = run_cli(*args(tiny_bert, tiny_data, out, *split), "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    # nothing was left to train: no throughput, rather than 0 samples/s over 0 s
    t = json.loads((out / "metrics.json").read_text())["train"]
    assert (t["steps"], t["resumed_at_step"], t["steps_timed"], t["samples_per_s"]) == (40, 40, 0, None)
    assert "train: resumed at step 40 of 40: no step left to train, so no throughput" in p.stdout
    assert (out / "tuned" / "model.safetensors").exists()


"""A run's snapshots carry how it read text and which rows it scored (run_settings.json): evaluate.py
and predict.py on them, with no data flags, reproduce the run's metrics.json; a flag overrides one
setting and says so; the token stores they build do not stay behind."""
import json
import os

import pandas as pd
import pytest

from conftest import run_cli, tiny_overrides
from engine import sources
from engine.errors import DataError
from engine.evaluation import evaluate_saved
from engine.finetune import finetune
from engine.recipe_yaml import load_recipe
from engine.run_settings import RowsAsked


@pytest.fixture(scope="module")
def run(tiny_bert, tiny_data, tmp_path_factory):
    """Selected on 32 held-out rows, reported on a 20-row subset of test, texts cut to their last 10
    tokens, scored in batches of 7, seed 3: nothing evaluate or predict would guess by default."""
    out = tmp_path_factory.mktemp("run")
    finetune(load_recipe(None, tiny_overrides(tiny_bert, tiny_data, out) + [
        "data.eval_split=null", "data.holdout_size=32", "data.test_split=test", "data.test_size=20",
        "data.max_length=10", "data.truncation=tail", "train.eval_batch_size=7", "seed=3"]))
    return out, json.loads((out / "metrics.json").read_text())


def _evaluate(*args, env=None):
    return run_cli("launch/evaluate.py", *args, env=env)


def _scored(out, side, *flags, tmp_path):
    p = _evaluate("--model", out / side, *flags, "--output", tmp_path / f"{side}.json")
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads((tmp_path / f"{side}.json").read_text()), p


def test_every_snapshot_carries_the_runs_settings(run):
    out, m = run
    for side in ("base", "tuned"):
        s = json.loads((out / side / "run_settings.json").read_text())
        assert s["input"] == {"max_length": 10, "truncation": "tail", "head_tokens": 128,
                              "label_names": m["data"]["labels"]}
        assert s["scoring"]["precision"] == "fp32" and s["scoring"]["batch_size"] == 7
        assert s["rows"]["seed"] == 3 and s["rows"]["scored"] == "test"
        assert s["rows"]["data"]["test_size"] == 20 and s["rows"]["data"]["holdout_size"] == 32
        assert os.path.isabs(s["rows"]["data"]["source"])


def test_evaluate_with_no_data_flags_reproduces_metrics_json(run, tmp_path):
    out, m = run
    for side in ("base", "tuned"):
        ev, p = _scored(out, side, tmp_path=tmp_path)
        assert ev["n"] == m[side]["n"] == 20
        assert ev["accuracy"] == m[side]["accuracy"]  # to the last digit
        assert ev["loss"] == pytest.approx(m[side]["loss"], rel=1e-6)
        assert ev["read_as"] == {"max_length": 10, "truncation": "tail", "head_tokens": 128, "batch_size": 7,
                                 "precision": "fp32"}
        assert ev["overrides"] == [] and "note" not in p.stderr
    assert m["base"]["accuracy"] < 0.8  # a figure that other rows would change, not a trivial 1.0


def test_predict_on_the_same_rows_gives_the_same_accuracy(run, tmp_path):
    out, m = run
    recipe = load_recipe(out / "recipe.yaml")
    test = sources.load_splits(recipe.data, recipe.seed).test  # the rows the run reported on
    truth = pd.DataFrame({"id": [f"r{row:03d}" for row in test.rows], "text": list(test.texts),
                          "gold": [m["data"]["labels"][y] for y in test.labels]})
    truth.to_csv(tmp_path / "rows.csv", index=False)
    for side in ("base", "tuned"):
        p = run_cli("launch/predict.py", "--model", out / side, "--input", tmp_path / "rows.csv",
                    "--keep-columns", "id", "--output", tmp_path / f"{side}.csv")
        assert p.returncode == 0, p.stderr[-2000:]
        pred = pd.read_csv(tmp_path / f"{side}.csv", dtype={"id": str}).merge(truth, on="id")
        assert len(pred) == m[side]["n"] == 20
        assert float((pred["label"] == pred["gold"]).mean()) == m[side]["accuracy"]


def test_size_on_the_runs_test_split_takes_the_runs_subset(run, tiny_data, tmp_path):
    # evaluate drew --size subsets with its own seed (42 + 1), the run its test_size with seed + 2
    out, m = run
    ev, _ = _scored(out, "base", "--data", tiny_data, "--split", "test", "--size", "20", "--max-length", "10",
                    "--truncation", "tail", "--batch-size", "7", tmp_path=tmp_path)
    assert ev["n"] == 20 and ev["accuracy"] == m["base"]["accuracy"]
    assert ev["loss"] == pytest.approx(m["base"]["loss"], rel=1e-6)


def _evaluate_here(model, **rows):
    """evaluate.py's engine call in this process (its flags: `rows`, and asked=cut flags); (metrics, notes)."""
    cut = ("max_length", "truncation", "head_tokens", "batch_size", "precision")
    asked = {k: rows.pop(k) for k in cut if k in rows}
    notes = []
    return evaluate_saved(str(model), RowsAsked(**rows), asked, say=notes.append), notes


def test_a_flag_overrides_one_setting_and_says_so(run, tiny_data):
    out, m = run
    ev, notes = _evaluate_here(out / "base", max_length=32, split="test")
    assert ev["read_as"]["max_length"] == 32 and ev["read_as"]["truncation"] == "tail" and ev["n"] == 20
    settings = out / "base" / "run_settings.json"
    assert notes == [f"note: --max-length 32 overrides the run's data.max_length=10 ({settings})"]
    assert ev["loss"] != pytest.approx(m["base"]["loss"], rel=1e-6)  # another cut, another figure
    ev, notes = _evaluate_here(out / "base", split="train")  # not a split the run scored: read whole
    assert ev["n"] == 192 and ev["split"] == "train" and notes == []
    ev, notes = _evaluate_here(out / "base", size=10)
    assert ev["n"] == 10 and notes == ["note: --size 10 overrides the run's data.test_size=20"]
    ev, notes = _evaluate_here(out / "base", source=tiny_data + "/test.parquet")
    assert ev["n"] == 33 and notes[0].startswith(f"note: --data {tiny_data}/test.parquet is not the run's data.source")


def test_without_run_settings_data_is_needed_and_a_single_file_is_one_split(tiny_bert, tiny_data, tmp_path):
    with pytest.raises(DataError, match="^--data is needed: the model carries no run settings naming its data$"):
        _evaluate_here(tiny_bert)
    pd.read_parquet(f"{tiny_data}/test.parquet").to_csv(tmp_path / "one.csv", index=False)
    ev, _ = _evaluate_here(tiny_bert, source=str(tmp_path / "one.csv"))
    assert ev["n"] == 33  # every row of the file
    assert ev["read_as"]["max_length"] == 128  # to the end of the model's positions (512 was refused outright)
    with pytest.raises(DataError, match="leave out --split") as e:
        _evaluate_here(tiny_bert, source=str(tmp_path / "one.csv"), split="test")
    assert "data." not in str(e.value)  # advice in the flags evaluate has, not recipe keys


def test_a_damaged_settings_file_is_one_line(run, tmp_path):
    import shutil
    out, _ = run
    copy = tmp_path / "tuned"
    shutil.copytree(out / "tuned", copy)
    (copy / "run_settings.json").write_text("{not json")
    p = _evaluate("--model", copy)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "run_settings.json: unreadable" in p.stderr


def test_token_stores_of_evaluate_and_predict_do_not_stay(run, tmp_path, monkeypatch):
    import tempfile

    from engine.paths import user_cache_dir
    from engine.prediction import label_file
    out, _ = run
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "in.txt").write_text("good film\nbad film\n")
    _evaluate_here(out / "tuned")
    label_file(str(out / "tuned"), tmp_path / "in.txt", tmp_path / "o.csv", num_threads=1)
    assert not (user_cache_dir() / "tokens").exists()  # each test has its own user cache (conftest)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_the_kernels_notice_is_silenced_for_every_command():
    # bitsandbytes' "could not verify publisher trust status" arrives through these loggers when
    # peft imports it; the module every model load goes through quiets them (predict included)
    code = ("import logging, engine.prediction; "
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('Failed to load CPU gemm_4bit_forward: "
            "Kernel repository could not verify publisher trust status'); "
            "logging.getLogger('kernels._internals.hf_hub').warning('Skipping publisher trust check')")
    p = run_cli("-c", code)
    assert p.returncode == 0 and p.stderr == ""

"""Select on dev, report on test: data.test_split is scored once at the end, for base and tuned."""
import json

import pytest

from conftest import run_cli, tiny_overrides
from engine.config import RecipeError
from engine.finetune import finetune
from engine.recipe_yaml import load_recipe


@pytest.fixture(scope="module")
def run(tiny_bert, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    over = tiny_overrides(tiny_bert, tiny_data, out) + [
        "data.eval_split=null", "data.holdout_size=32", "data.test_split=test",
        "train.eval_every=4", "train.keep_best=true"]
    finetune(load_recipe(None, over))
    return out, json.loads((out / "metrics.json").read_text())


def evaluate_cli(folder, data, out_file):
    p = run_cli("launch/evaluate.py", "--model", folder, "--data", data, "--split", "test",
                "--max-length", "32", "--output", out_file)
    assert p.returncode == 0, p.stderr
    return json.loads(out_file.read_text())


def test_base_and_tuned_are_the_saved_snapshots_on_test(run, tiny_data):
    out, m = run
    assert m["base"]["n"] == m["tuned"]["n"] == m["data"]["test_n"] == 33  # the whole test split
    assert m["data"]["eval_n"] == 32 and "held out" in m["data"]["eval"]
    for side in ("base", "tuned"):
        ev = evaluate_cli(out / side, tiny_data, out / f"{side}-test.json")
        assert ev["n"] == 33
        assert m[side]["accuracy"] == pytest.approx(ev["accuracy"])
        assert m[side]["loss"] == pytest.approx(ev["loss"], rel=1e-4)
    assert m["tuned"]["accuracy"] > 0.9 > m["base"]["accuracy"]


def test_selection_is_on_dev(run):
    _, m = run
    assert m["dev"]["tuned"]["n"] == m["dev"]["base"]["n"] == 32
    best = max(m["evals"], key=lambda e: e["accuracy"])  # the first of the best, as keep_best keeps it
    assert m["tuned"]["step"] == best["step"]
    assert m["dev"]["tuned"]["accuracy"] == best["accuracy"]


def test_test_size_takes_a_stratified_subset(tiny_bert, tiny_data, tmp_path):
    over = tiny_overrides(tiny_bert, tiny_data, tmp_path) + [
        "data.eval_split=null", "data.holdout_size=32", "data.test_split=test", "data.test_size=10",
        "train.epochs=1"]
    report = finetune(load_recipe(None, over))
    assert report["base"]["n"] == report["tuned"]["n"] == 10
    assert [c["support"] for c in report["tuned"]["per_class"].values()] == [5, 5]


def test_without_test_split_nothing_changes(tiny_bert, tiny_data, tmp_path):
    report = finetune(load_recipe(None, tiny_overrides(tiny_bert, tiny_data, tmp_path) + ["train.epochs=1"]))
    assert "dev" not in report and "test" not in report["data"]
    assert report["tuned"]["accuracy"] == report["evals"][-1]["accuracy"]  # the eval split's score


@pytest.mark.parametrize("over, match", [
    (["data.test_split=test"], "must differ"),  # eval_split is test by default: selection on test
    (["data.eval_split=null", "data.holdout_size=8", "data.test_split=train"], "must differ"),
    (["data.test_size=10"], "needs 'data.test_split'"),
    (["data.eval_split=null", "data.holdout_size=8", "data.test_split=test", "data.test_size=0"], ">= 1"),
])
def test_bad_test_split_settings(over, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(None, over)


def test_qlora_reports_the_snapshots_on_test_and_the_4bit_model_on_dev(tiny_data, tmp_path):
    import tiny
    from engine.evaluation import evaluate_pretrained

    wide = tiny.make_model(tmp_path / "wide", "bert", hidden=64, vocab_size=4000, init_range=0.1)
    out = tmp_path / "run"
    recipe = load_recipe(None, tiny_overrides(wide, tiny_data, out) + [
        "peft.method=qlora", "train.epochs=2", "train.lr=1e-2", "train.precision=fp32",
        "data.eval_split=null", "data.holdout_size=32", "data.test_split=test", "train.keep_best=true"])
    m = finetune(recipe)
    assert m["peft"]["quantized"] == m["dev"]  # what selected: the 4-bit model as it trained
    assert m["dev"]["tuned"]["n"] == 32 and m["tuned"]["n"] == 33
    for side in ("base", "tuned"):
        scored = evaluate_pretrained(str(out / side), recipe.data, "test")
        assert scored["accuracy"] == pytest.approx(m[side]["accuracy"])
        assert scored["loss"] == pytest.approx(m[side]["loss"], abs=1e-5)

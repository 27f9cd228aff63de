"""Model comparison: label-set mapping, abstention, calibration, reports, and the CLI.

The models are tiny BERTs whose classification head is zeroed except for its bias, so every text
gets exactly the probabilities the test chose: what the report shows can be checked by hand.
"""
import json
import math
import sys

import numpy as np
import pandas as pd
import pytest

import tiny
from conftest import run_cli
from engine.compare import (
    NEG,
    NEU,
    POS,
    CompareRecipe,
    VaderScorer,
    collapse,
    compare,
    fit_temperature,
    load_eval_set,
    map_labels,
    polarity_metrics,
    verdict,
)
from engine.config import DataConfig
from engine.errors import ModelError, RecipeError
from engine.metrics import brier_score, expected_calibration_error, reliability_bins
from engine.recipe_yaml import load_recipe
from engine.sources import load_splits

STARS = {i: f"{i + 1} star" + ("s" if i else "") for i in range(5)}
# name: (id2label, the probabilities every text gets)
FIXED = {
    "bertweet_like": ({0: "NEG", 1: "NEU", 2: "POS"}, [0.1, 0.2, 0.7]),
    "finbert_like": ({0: "positive", 1: "negative", 2: "neutral"}, [0.25, 0.2, 0.55]),
    "stars_like": (STARS, [0.05, 0.10, 0.20, 0.30, 0.35]),
    "label_n": ({0: "LABEL_0", 1: "LABEL_1"}, [0.45, 0.55]),
}


def fixed_head_model(folder, id2label: dict, probs: list) -> str:
    """A tiny classifier that outputs log(probs) whatever the text."""
    import torch
    from transformers import AutoModelForSequenceClassification

    path = tiny.make_model(folder, num_labels=len(id2label), id2label=id2label)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.log(torch.tensor(probs)))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: fixed_head_model(root / name, i2l, p) for name, (i2l, p) in FIXED.items()}


@pytest.fixture(scope="module")
def two_class_data(tmp_path_factory):
    return tiny.make_data(tmp_path_factory.mktemp("data2"), n_train=16, n_test=40)


@pytest.fixture(scope="module")
def three_class_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data3")
    words = {"negative": "awful", "neutral": "the", "positive": "great"}
    rows = [(f"{w} film {i}", label) for i in range(10) for label, w in words.items()]
    pd.DataFrame(rows, columns=["news", "label"]).to_csv(folder / "all.csv", index=False)
    return str(folder / "all.csv")


@pytest.fixture(scope="module")
def report(models, two_class_data, three_class_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    recipe = load_recipe(None, [
        f"output_dir={out}",
        f"models=[{','.join(models.values())},vader]",
        f"label_maps={{{models['label_n']}: {{LABEL_0: negative, LABEL_1: positive}}}}",
        f"datasets=[{{name: two, source: {two_class_data}, label_names: [negative, positive], "
        f"max_length: 32, val_size: 10}}, {{name: three, source: {three_class_data}, text_column: news, "
        f"eval_split: null, holdout_size: 15, val_size: 6, max_length: 32}}]",
        "num_threads=1",
    ], schema=CompareRecipe)
    return out, compare(recipe)


def res(report, model, phrase=0):
    return report["phrases"][phrase]["results"][model]


# ---- label sets -------------------------------------------------------------------------------------

def test_each_label_set_is_mapped(report):
    _, r = report
    maps = {m["name"]: m["polarity_of_label"] for m in r["models"]}
    assert maps["bertweet_like"] == {"NEG": "negative", "NEU": "neutral", "POS": "positive"}
    assert maps["finbert_like"] == {"positive": "positive", "negative": "negative", "neutral": "neutral"}
    assert maps["stars_like"] == {"1 star": "negative", "2 stars": "negative", "3 stars": "neutral",
                                  "4 stars": "positive", "5 stars": "positive"}
    assert maps["label_n"] == {"LABEL_0": "negative", "LABEL_1": "positive"}  # from the recipe
    assert maps["vader"] == {"negative": "negative", "neutral": "neutral", "positive": "positive"}


def test_phrase_distribution_polarity_and_abstention(report):
    _, r = report
    for phrase in range(3):
        b = res(r, "bertweet_like", phrase)
        assert b["distribution"] == pytest.approx({"NEG": 0.1, "NEU": 0.2, "POS": 0.7}, abs=1e-6)
        assert (b["top_label"], b["polarity"], b["verdict"]) == ("POS", "positive", "positive")
        assert b["margin"] == pytest.approx(0.5, abs=1e-6)
        h = -(0.1 * math.log2(0.1) + 0.2 * math.log2(0.2) + 0.7 * math.log2(0.7))
        assert b["entropy_bits"] == pytest.approx(h, abs=1e-5)
        assert b["entropy_normalised"] == pytest.approx(h / math.log2(3), abs=1e-5)
        f = res(r, "finbert_like", phrase)  # neutral wins: abstain, however sure
        assert (f["top_label"], f["polarity"], f["verdict"]) == ("neutral", "neutral", "abstain")
        n = res(r, "label_n", phrase)  # positive, but 0.55 < threshold 0.6: abstain
        assert (n["polarity"], n["verdict"]) == ("positive", "abstain")
        expected = {"negative": 0.45, "neutral": 0.0, "positive": 0.55}
        assert n["polarity_probabilities"] == pytest.approx(expected, abs=1e-6)
    # expected polarities of the seed's phrases: positive, negative, neutral (ambiguous)
    assert [res(r, "bertweet_like", i)["matches_expected"] for i in range(3)] == [True, False, False]
    assert [res(r, "finbert_like", i)["matches_expected"] for i in range(3)] == [False, False, True]


def test_five_stars_collapse_to_three_polarities(report):
    _, r = report
    s = res(r, "stars_like")
    assert s["polarity_probabilities"] == pytest.approx(
        {"negative": 0.05 + 0.10, "neutral": 0.20, "positive": 0.30 + 0.35}, abs=1e-6)
    assert (s["top_label"], s["top_probability"]) == ("5 stars", pytest.approx(0.35, abs=1e-6))
    assert (s["polarity"], s["verdict"]) == ("positive", "positive")  # 0.65 >= 0.6
    assert s["score"] == pytest.approx(1 * .05 + 2 * .10 + 3 * .20 + 4 * .30 + 5 * .35, abs=1e-5)  # expected stars


def test_collapse_sums_per_polarity():
    lm = map_labels(list(STARS.values()))
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=7)
    got = collapse(p, lm)
    assert got == pytest.approx(np.stack([p[:, 0] + p[:, 1], p[:, 2], p[:, 3] + p[:, 4]], axis=1))
    assert got.sum(axis=1) == pytest.approx(np.ones(7))


@pytest.mark.parametrize("labels, polarity", [
    (["NEG", "NEU", "POS"], [NEG, NEU, POS]),
    (["Positive", "NEGATIVE", "neutral"], [POS, NEG, NEU]),
    (["neg", "pos"], [NEG, POS]),
    (["1 star", "2 stars", "3 stars", "4 stars", "5 stars"], [NEG, NEG, NEU, POS, POS]),
])
def test_recognised_names(labels, polarity):
    assert map_labels(labels).polarity == polarity


def test_recipe_mapping_overrides_recognition():
    lm = map_labels(["1 star", "2 stars", "3 stars", "4 stars", "5 stars"],
                    {"2 stars": "neutral", "4 stars": "neutral"})
    assert lm.polarity == [NEG, NEU, NEU, NEU, POS]


def test_unknown_label_set_says_how_to_map_it(models, tmp_path):
    with pytest.raises(RecipeError) as e:
        map_labels(["LABEL_0", "LABEL_1"], who="some/model")
    msg = str(e.value)
    assert "\n" not in msg
    assert "cannot map labels ['LABEL_0', 'LABEL_1'] onto negative/neutral/positive" in msg
    assert "label_maps={'some/model': {LABEL_0: negative|neutral|positive, LABEL_1: negative|neutral|positive}}" in msg
    with pytest.raises(RecipeError, match=r"label_maps names \['LABEL_9'\], but its labels are"):
        map_labels(["LABEL_0", "LABEL_1"], {"LABEL_9": "negative"})
    with pytest.raises(RecipeError, match="cannot map labels"):  # one pole only: not a sentiment map
        map_labels(["LABEL_0", "LABEL_1"], {"LABEL_0": "neutral", "LABEL_1": "positive"})
    recipe = load_recipe(None, [f"models=[{models['label_n']}]", f"output_dir={tmp_path}"], schema=CompareRecipe)
    with pytest.raises(RecipeError, match="LABEL_0"):
        compare(recipe)


def test_verdict_rules():
    assert verdict(np.array([0.1, 0.2, 0.7]), 0.6) == "positive"
    assert verdict(np.array([0.7, 0.2, 0.1]), 0.6) == "negative"
    assert verdict(np.array([0.3, 0.3, 0.4]), 0.6) == "abstain"  # unsure
    assert verdict(np.array([0.2, 0.5, 0.3]), 0.0) == "abstain"  # neutral, even with no threshold
    assert verdict(np.array([0.45, 0.0, 0.55]), 0.5) == "positive"


def test_vader_follows_its_compound_rule():
    v = VaderScorer("vader")
    texts = ["I love you", "I hate you", "the table is in the kitchen", "not bad at all", "this is terrible"]
    c = v.compound(texts)
    got = v.logits(texts).argmax(axis=1)
    want = np.where(c >= 0.05, POS, np.where(c <= -0.05, NEG, NEU))
    assert got.tolist() == want.tolist()
    assert c[2] == 0.0 and got[2] == NEU


def test_missing_vader_names_the_extra_before_any_scoring(models, tmp_path, monkeypatch):
    # vaderSentiment comes with the `compare` install extra; None in sys.modules makes its import fail
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(ModelError) as e:
        VaderScorer("vader")
    assert "\n" not in str(e.value) and "pip install -e '.[compare]'" in str(e.value)
    out = tmp_path / "out"
    recipe = load_recipe(None, [f"models=[{models['bertweet_like']},vader]", f"output_dir={out}"],
                         schema=CompareRecipe)
    with pytest.raises(ModelError, match=r"\[compare\]"):
        compare(recipe)
    assert not out.exists()  # refused before the first model was scored


def test_model_without_trained_head_is_refused(tmp_path):
    from transformers import AutoConfig, AutoModel

    tok = tiny.make_tokenizer()
    cfg = AutoConfig.for_model("bert", vocab_size=len(tok), id2label={0: "negative", 1: "positive"},
                               **{k: v for k, v in tiny.ARCH["bert"].items() if k != "model_type"})
    AutoModel.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    recipe = load_recipe(None, [f"models=[{tmp_path}]", f"output_dir={tmp_path / 'out'}"], schema=CompareRecipe)
    with pytest.raises(ModelError, match="has no trained classification head"):
        compare(recipe)


# ---- calibration and dataset metrics --------------------------------------------------------------

def test_calibration_by_hand():
    pol = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.2, 0.6], [0.05, 0.05, 0.9]])
    gold = np.array([NEG, NEU, POS, POS])
    # Brier: (.09+.04+.01) + (.01+.49+.36) + (.04+.04+.16) + (.0025+.0025+.01)
    assert brier_score(pol, gold) == pytest.approx((0.14 + 0.86 + 0.24 + 0.015) / 4)
    # bins: 0.7 -> (0.6,0.7] right, 0.6 twice -> (0.5,0.6] one right one wrong, 0.9 -> (0.8,0.9] right
    ece = 0.25 * abs(1 - 0.7) + 0.5 * abs(0.5 - 0.6) + 0.25 * abs(1 - 0.9)
    assert expected_calibration_error(pol, gold) == pytest.approx(ece)
    bins = {round(b["hi"], 6): b for b in reliability_bins(pol, gold) if b["n"]}
    assert sorted(bins) == [0.6, 0.7, 0.9]
    assert (bins[0.6]["n"], bins[0.6]["accuracy"], bins[0.6]["confidence"]) == (2, 0.5, pytest.approx(0.6))
    assert (bins[0.9]["n"], bins[0.9]["accuracy"]) == (1, 1.0)
    m = polarity_metrics(pol, gold, {NEG, NEU, POS}, True, 10)
    assert (m["accuracy"], m["ece"], m["brier"]) == (pytest.approx(0.75), pytest.approx(ece),
                                                      pytest.approx(1.255 / 4))


def test_two_views_of_neutral_on_two_class_data():
    # gold neg neg pos pos; predicted neg neu pos neg
    pol = np.array([[0.8, 0.1, 0.1], [0.3, 0.5, 0.2], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    gold = np.array([NEG, NEG, POS, POS])
    m = polarity_metrics(pol, gold, {NEG, POS}, True, 10)
    assert m["accuracy"] == pytest.approx(2 / 4)  # neutral counted wrong
    assert m["coverage"] == pytest.approx(3 / 4)  # neutral as abstention
    assert m["selective_accuracy"] == pytest.approx(2 / 3)
    assert m["forced_accuracy"] == pytest.approx(3 / 4)  # neg .3 > pos .2 on the neutral one
    assert m["confusion"] == [[1, 1, 0], [0, 0, 0], [1, 0, 1]]
    # macro-F1 over all 3 polarities the model can answer: neg P=R=1/2; neu 0 (answered once, never
    # right); pos P=1, R=1/2 -> 2/3. Dropping the absent neutral would give 7/12, above the accuracy.
    assert m["f1"] == pytest.approx((1 / 2 + 0 + 2 / 3) / 3)
    two = polarity_metrics(pol[:, [0, 2]] @ np.array([[1, 0, 0], [0, 0, 1.0]]), gold, {NEG, POS}, False, 10)
    assert "coverage" not in two
    # a 2-class model, predicted neg neg pos neg: neg P=2/3, R=1 -> 4/5; pos P=1, R=1/2 -> 2/3; no neutral
    assert two["f1"] == pytest.approx((4 / 5 + 2 / 3) / 2)


def test_temperature_by_hand():
    # logits (0, s) everywhere, 3 of 4 labelled 1: NLL is least where sigmoid(s / T) = 3/4, T = s / ln 3
    lm = map_labels(["negative", "positive"])
    logits = np.array([[0.0, 4.0]] * 4)
    gold = np.array([POS, POS, POS, NEG])
    assert fit_temperature(logits, gold, lm) == pytest.approx(4 / math.log(3), rel=1e-5)
    # through the 3-polarity collapse of a star model: the same answer when only 2 stars carry mass
    stars = map_labels(list(STARS.values()))
    logits5 = np.array([[0.0, -50, -50, -50, 4.0]] * 4)
    assert fit_temperature(logits5, gold, stars) == pytest.approx(4 / math.log(3), rel=1e-4)


def test_dataset_metrics_in_the_report(report):
    _, r = report
    two = next(d for d in r["datasets"] if d["name"] == "two")
    assert two["n"] == 30 and two["n_val"] == 10 and two["classes"] == ["negative", "positive"]
    b = two["results"]["bertweet_like"]  # always positive 0.7, half the examples are positive
    assert b["accuracy"] == pytest.approx(0.5) and b["coverage"] == 1.0 and b["selective_accuracy"] == 0.5
    assert b["ece"] == pytest.approx(0.7 - 0.5, abs=1e-5)
    assert b["brier"] == pytest.approx(((0.1**2 + 0.2**2 + 0.3**2) + (0.9**2 + 0.2**2 + 0.7**2)) / 2, abs=1e-5)
    f = two["results"]["finbert_like"]  # always neutral: wrong in one view, abstains in the other
    assert f["accuracy"] == 0.0 and f["coverage"] == 0.0 and f["selective_accuracy"] is None
    t = b["temperature"]
    assert t["n_val"] == 10 and t["t"] > 0
    assert t["before"]["ece"] == pytest.approx(b["ece"])
    assert sum(x["n"] for x in b["length_buckets"]) == 30
    three = next(d for d in r["datasets"] if d["name"] == "three")
    assert three["classes"] == ["negative", "neutral", "positive"] and three["n"] == 15 - 6
    n = three["results"]["label_n"]  # a 2-class model on 3-class data never says neutral
    assert n["predicted_share"]["neutral"] == 0.0 and "polar_only_accuracy" in n
    assert three["results"]["vader"]["accuracy"] > 0.9  # 'awful' / 'the' / 'great' are easy for a lexicon


def test_holdout_dataset_is_the_rows_training_held_out(three_class_data):
    from engine.compare import CompareData
    cfg = CompareData(source=three_class_data, text_column="news", eval_split=None, holdout_size=15, val_size=6)
    ev = load_eval_set(cfg, seed=42)
    held = load_splits(DataConfig(source=three_class_data, text_column="news", eval_split=None, holdout_size=15), 42)
    assert sorted(ev.test.texts + ev.val.texts) == sorted(held.eval.texts)
    assert not set(ev.test.texts) & set(ev.val.texts)
    assert not set(ev.test.texts) & set(held.train.texts)


# ---- report files ---------------------------------------------------------------------------------

def test_report_files_hold_every_model(report):
    out, r = report
    names = ["bertweet_like", "finbert_like", "stars_like", "label_n", "vader"]
    assert [m["name"] for m in r["models"]] == names
    saved = json.loads((out / "report.json").read_text())
    sure = saved["summary"]["phrase_confidence"]  # mean winning-polarity probability over the phrases
    assert sure == pytest.approx(r["summary"]["phrase_confidence"], abs=1e-5)
    assert {k: sure[k] for k in names[:4]} == pytest.approx(
        {"bertweet_like": 0.7, "finbert_like": 0.55, "stars_like": 0.65, "label_n": 0.55}, abs=1e-5)
    assert saved["summary"]["most_sure_on_phrases"] == ("vader" if sure["vader"] > 0.7 else "bertweet_like")
    for p in saved["phrases"]:
        assert sorted(p["results"]) == sorted(names)
    for d in saved["datasets"]:
        assert sorted(d["results"]) == sorted(names)
    md = (out / "report.md").read_text()
    for name in names:
        assert md.count(f"| {name} |") >= 3 + 2  # the models table, each phrase, each dataset
    for png in ["phrases.png", "reliability_two.png", "reliability_three.png", "length_accuracy.png"]:
        assert png in r["plots"]
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["summary"]["best_on_ambiguous"] == "finbert_like"  # the one that abstains on neutral


# ---- recipe and CLI -------------------------------------------------------------------------------

def test_list_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("models: [x, y]\ndatasets:\n  - {source: ../d, eval_split: dev}\n")
    r = load_recipe(f, ["models=[a,b,vader]", "datasets=[]"], schema=CompareRecipe)
    assert r.models == ["a", "b", "vader"] and r.datasets == []
    r = load_recipe(f, [], schema=CompareRecipe)
    assert r.datasets[0].source == "../d" and r.datasets[0].val_size == 200
    assert [p.expected for p in r.phrases] == ["positive", "negative", "neutral"]  # the seed's phrases
    with pytest.raises(RecipeError, match=r"unknown key 'datasets\[0\].sorce'"):
        load_recipe(None, ["datasets=[{sorce: x}]"], schema=CompareRecipe)
    with pytest.raises(RecipeError, match="'models' is empty"):
        load_recipe(None, ["models=[]"], schema=CompareRecipe)


def test_phrases_file(tmp_path, models):
    f = tmp_path / "p.csv"
    pd.DataFrame({"text": ["great film", "awful"], "expected": ["positive", None]}).to_csv(f, index=False)
    r = compare(load_recipe(None, [f"models=[{models['bertweet_like']}]", f"phrases_file={f}",
                                   f"output_dir={tmp_path / 'out'}"], schema=CompareRecipe))
    assert [(p["text"], p["expected"]) for p in r["phrases"]] == [("great film", "positive"), ("awful", None)]


def test_cli_prints_the_phrase_table(models, tmp_path):
    recipe = tmp_path / "c.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'out'}\nmodels: [{models['stars_like']}]\n")
    p = run_cli("launch/compare.py", "--recipe", recipe, "models=[" + models["stars_like"] + ",vader]", "num_threads=1")
    assert p.returncode == 0, p.stderr
    assert '"I love you"  (expected: positive)' in p.stdout
    assert "stars_like  5 stars 0.350" in p.stdout and "vader" in p.stdout
    assert (tmp_path / "out" / "report.md").exists()


def test_cli_bad_input_exits_2_with_one_line(models, tmp_path):
    recipe = tmp_path / "c.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'out'}\nmodels: [{models['label_n']}]\n")
    p = run_cli("launch/compare.py", "--recipe", recipe, "num_threads=1")
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ")
    assert "['LABEL_0', 'LABEL_1']" in p.stderr and "label_maps=" in p.stderr
    p = run_cli("launch/compare.py", "--recipe", recipe, "abstain_treshold=0.5")
    assert p.returncode == 2
    assert p.stderr.strip() == f"error: {recipe}: unknown key 'abstain_treshold' (did you mean 'abstain_threshold'?)"

"""Reading splits from every kind of source, label ids and class names, seeded subsets, bad data."""
import json
import re

import numpy as np
import pandas as pd
import pytest

import tiny
from conftest import run_cli, tiny_overrides
from engine.config import DataConfig
from engine.errors import DataError
from engine.sources import load_splits, stratified_subset


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_folder_of_split_files(tmp_path, fmt):
    folder = tiny.make_data(tmp_path / fmt, n_train=20, n_test=11, fmt=fmt)
    s = load_splits(DataConfig(source=folder), seed=0)
    assert len(s.train.texts) == 20 and len(s.eval.texts) == 11
    assert s.label_names == ["LABEL_0", "LABEL_1"]
    assert set(s.train.labels.tolist()) == {0, 1}


def test_aclimdb_layout(tmp_path):
    for split in ("train", "test"):
        for sub, n in (("pos", 3), ("neg", 2)):
            (tmp_path / split / sub).mkdir(parents=True)
            for i in range(n):
                (tmp_path / split / sub / f"{i}_7.txt").write_text(f"{sub} review {i}")
    s = load_splits(DataConfig(source=str(tmp_path)), seed=0)
    assert sorted(zip(s.train.texts, s.train.labels.tolist(), strict=True))[0] == ("neg review 0", 0)
    assert s.label_names == ["neg", "pos"] and s.train.labels.sum() == 3


def test_text_label_pair_with_mapping(tmp_path):
    (tmp_path / "test_text.txt").write_text("meh\nyay\nboo\n")
    (tmp_path / "test_labels.txt").write_text("1\n2\n0\n")
    (tmp_path / "mapping.txt").write_text("0\tnegative\n1\tneutral\n2\tpositive\n")
    s = load_splits(DataConfig(source=str(tmp_path), train_split="test", eval_split="test"), seed=0)
    assert s.label_names == ["negative", "neutral", "positive"]
    assert s.eval.labels.tolist() == [1, 2, 0]


def test_single_file_with_string_labels_filter_and_holdout(tmp_path):
    f = tmp_path / "all.csv"
    rows = [("good", "positive", "a"), ("bad", "negative", "a"), ("meh", "neutral", "b")] * 20
    pd.DataFrame(rows, columns=["news", "label", "src"]).to_csv(f, index=False)
    cfg = DataConfig(source=str(f), text_column="news", eval_split=None, holdout_size=10, where={"src": "a"})
    s = load_splits(cfg, seed=3)
    assert s.label_names == ["negative", "positive"]  # sorted; "neutral" rows were filtered out
    assert len(s.eval.texts) == 10 and len(s.train.texts) == 30
    assert sorted(s.eval.labels.tolist()) == [0] * 5 + [1] * 5  # stratified
    again = load_splits(cfg, seed=3)
    assert again.eval.texts == s.eval.texts  # seeded


def test_rename_columns_per_split_layout(tmp_path):
    # SST-2's layout: train.tsv names its text column `sentence`, dev.tsv names it `content`
    (tmp_path / "train.tsv").write_text("label\tsentence\n0\tdull , weak\n1\tit 's \"great\"\n")
    (tmp_path / "dev.tsv").write_text("label\tcontent\n1\tsuperb\n0\tawful\n")
    cfg = DataConfig(source=str(tmp_path), text_column="sentence", eval_split="dev")
    with pytest.raises(DataError, match=r"dev.tsv: no column 'sentence' \(data.text_column\); columns: label, content"):
        load_splits(cfg, 0)
    cfg.rename_columns = {"content": "sentence"}
    s = load_splits(cfg, 0)
    assert s.train.texts == ["dull , weak", 'it \'s "great"'] and s.eval.texts == ["superb", "awful"]
    assert s.eval.labels.tolist() == [1, 0]


def test_rename_columns_refuses_a_clash(tmp_path):
    pd.DataFrame({"text": ["a", "b"], "body": ["x", "y"], "label": [0, 1]}).to_csv(tmp_path / "train.csv", index=False)
    cfg = DataConfig(source=str(tmp_path), eval_split="train", rename_columns={"body": "text"})
    with pytest.raises(DataError, match="renames 'body' to 'text', but both columns are there"):
        load_splits(cfg, 0)


def test_holdout_is_disjoint_from_train(tmp_path):
    f = tmp_path / "all.csv"
    frame = pd.DataFrame({"text": [f"review number {i}" for i in range(100)], "label": [i % 2 for i in range(100)]})
    frame.to_csv(f, index=False)
    s = load_splits(DataConfig(source=str(f), eval_split=None, holdout_size=30, train_size=50), seed=1)
    assert len(s.eval.texts) == 30 and len(s.train.texts) == 50
    assert not set(s.eval.texts) & set(s.train.texts)


def test_stratified_subset_keeps_proportions_and_is_seeded():
    labels = np.array([0] * 900 + [1] * 100)
    idx = stratified_subset(labels, 100, seed=5)
    assert len(idx) == 100 == len(set(idx.tolist()))
    assert labels[idx].sum() == 10
    assert (idx == stratified_subset(labels, 100, seed=5)).all()
    assert not (idx == stratified_subset(labels, 100, seed=6)).all()


# ---- bad data: one line naming file, row, column ----------------------------------------------

def _write(tmp_path, train: pd.DataFrame, test: pd.DataFrame | None = None):
    train.to_csv(tmp_path / "train.csv", index=False)
    (test if test is not None else train).to_csv(tmp_path / "test.csv", index=False)
    return str(tmp_path)


def test_missing_path():
    with pytest.raises(DataError, match="/no/such/folder: data.source does not exist"):
        load_splits(DataConfig(source="/no/such/folder"), 0)


def test_missing_split(tmp_path):
    tiny.make_data(tmp_path, fmt="csv")
    with pytest.raises(DataError, match="no split 'validation'"):
        load_splits(DataConfig(source=str(tmp_path), eval_split="validation"), 0)


def test_missing_column(tmp_path):
    src = _write(tmp_path, pd.DataFrame({"review": ["a", "b"], "label": [0, 1]}))
    with pytest.raises(DataError, match=r"train.csv: no column 'text' \(data.text_column\); columns: review, label"):
        load_splits(DataConfig(source=src), 0)


def test_label_out_of_range_names_row(tmp_path):
    train = pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 0]})
    test = pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 7]})
    src = _write(tmp_path, train, test)
    with pytest.raises(DataError, match=r"test.csv: row 3, column 'label': label 7 out of range 0..1"):
        load_splits(DataConfig(source=src), 0)


def test_unknown_string_label(tmp_path):
    src = _write(tmp_path, pd.DataFrame({"text": ["a", "b"], "label": ["pos", "neg"]}),
                 pd.DataFrame({"text": ["a", "b"], "label": ["pos", "meh"]}))
    with pytest.raises(DataError, match=r"test.csv: row 2, column 'label': unknown label 'meh'"):
        load_splits(DataConfig(source=src), 0)


def test_empty_text_cell(tmp_path):
    src = _write(tmp_path, pd.DataFrame({"text": ["a", None, "c"], "label": [0, 1, 0]}))
    with pytest.raises(DataError, match=r"train.csv: row 2, column 'text': expected text"):
        load_splits(DataConfig(source=src), 0)


def test_undecodable_text_names_line(tmp_path):
    (tmp_path / "train.csv").write_bytes(b"text,label\ngood,1\nbad \xff\xfe,0\n")
    with pytest.raises(DataError, match=r"train.csv: line 3: text is not valid utf-8"):
        load_splits(DataConfig(source=str(tmp_path), eval_split="train"), 0)
    s = load_splits(DataConfig(source=str(tmp_path), eval_split="train", encoding="latin-1"), 0)
    assert s.train.texts[1] == "bad \xff\xfe"


def test_empty_split(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="split 'train' is empty"):
        load_splits(DataConfig(source=str(tmp_path), eval_split="train"), 0)


MODEL_NAMES = ["negative", "positive"]


def _mapped_pair(folder, mapping):
    """TweetEval's layout: integer labels beside a mapping file that names them."""
    folder.mkdir()
    (folder / "train_text.txt").write_text("meh\nyay\nboo\nhm\n")
    (folder / "train_labels.txt").write_text("1\n0\n1\n0\n")
    (folder / "mapping.txt").write_text(mapping)
    return str(folder)


@pytest.mark.parametrize("level, expected", [
    ("recipe", ["bad", "good"]),  # data.label_names first
    ("source", ["neg", "pos"]),  # then the names the source declares (mapping.txt)
    ("model", MODEL_NAMES),  # then the model's own names, for bare integers
    ("model, other count", ["LABEL_0", "LABEL_1"]),  # ... only when they count the data's classes
    ("none", ["LABEL_0", "LABEL_1"]),
])
def test_class_names_precedence(tmp_path, level, expected):
    if level in ("recipe", "source"):
        source = _mapped_pair(tmp_path / "pair", "0\tneg\n1\tpos\n")
        cfg = DataConfig(source=source, eval_split="train", label_names=["bad", "good"] if level == "recipe" else None)
    else:
        cfg = DataConfig(source=tiny.make_data(tmp_path / "ints", n_train=20, n_test=11))
    named = {"none": None, "model, other count": ["negative", "neutral", "positive"]}.get(level, MODEL_NAMES)
    s = load_splits(cfg, seed=0, model_names=lambda: named)
    assert s.label_names == expected
    assert set(s.train.labels.tolist()) == {0, 1}


def _ints(tmp_path, train, test):
    tmp_path.mkdir(exist_ok=True)
    for split, labels in (("train", train), ("test", test)):
        pd.DataFrame({"text": [f"text {i}" for i in range(len(labels))], "label": labels}).to_csv(
            tmp_path / f"{split}.csv", index=False)
    return str(tmp_path)


def test_labels_counted_from_one_are_their_own_classes(tmp_path):
    # Yelp / Amazon polarity CSVs store 1/2: two classes, not a third "0" that never occurs
    from engine.metrics import classification_metrics
    s = load_splits(DataConfig(source=_ints(tmp_path, [1, 2, 2, 1], [2, 1])), seed=0,
                    model_names=lambda: ["negative", "neutral", "positive"])
    assert s.label_names == ["1", "2"]
    assert s.train.labels.tolist() == [0, 1, 1, 0] and s.eval.labels.tolist() == [1, 0]
    perfect = np.eye(2)[s.eval.labels] * 5
    assert classification_metrics(perfect, s.eval.labels, s.label_names)["f1"] == 1.0


def test_stars_one_to_five_and_zero_based_labels_keep_their_ids(tmp_path):
    s = load_splits(DataConfig(source=_ints(tmp_path / "stars", [1, 3, 5, 2], [4, 5])), seed=0)
    assert s.label_names == ["1", "2", "3", "4", "5"] and s.eval.labels.tolist() == [3, 4]
    # 0..K-1 (IMDB, SST-2, TweetEval) as before: ids as stored, LABEL_i names
    s = load_splits(DataConfig(source=_ints(tmp_path / "zero", [0, 1, 2, 1], [2, 0])), seed=0)
    assert s.label_names == ["LABEL_0", "LABEL_1", "LABEL_2"] and s.eval.labels.tolist() == [2, 0]


def test_numbering_is_decided_over_train_and_eval(tmp_path):
    # train happens to lack class 0, eval has it: the data counts from 0, and the ids are as stored
    s = load_splits(DataConfig(source=_ints(tmp_path / "a", [1, 2, 1, 2], [0, 2])), seed=0)
    assert s.label_names == ["LABEL_0", "LABEL_1", "LABEL_2"] and s.train.labels.tolist() == [1, 2, 1, 2]
    # an eval label past train's classes is still refused, whichever way they count
    with pytest.raises(DataError, match=r"test.csv: row 2, column 'label': label 3 is not one of the classes 1, 2"):
        load_splits(DataConfig(source=_ints(tmp_path / "c", [1, 2, 1, 2], [2, 3])), seed=0)
    # a test split holding a value no class stands for stops with its row
    src = _ints(tmp_path / "b", [1, 2, 1, 2], [2, 1])
    pd.DataFrame({"text": ["x", "y"], "label": [1, 0]}).to_csv(tmp_path / "b" / "extra.csv", index=False)
    with pytest.raises(DataError, match=r"extra.csv: row 2, column 'label': label 0 is not one of the classes 1, 2"):
        load_splits(DataConfig(source=src, test_split="extra"), seed=0)


@pytest.mark.parametrize("mapping, expected", [
    ("0 neg\n1 pos\n", "line 1: expected '<class id><tab><name>'"),
    ("zero\tneg\n1\tpos\n", "line 1: expected"),
    ("0\tneg\n0\tpos\n", "line 2: class id 0 named twice"),
    ("0\tneg\n2\tpos\n", "class ids must be 0..K-1"),
    ("0\t\n1\tpos\n", "line 1: expected"),
])
def test_malformed_mapping_file_names_its_line(tmp_path, mapping, expected):
    source = _mapped_pair(tmp_path / "pair", mapping)
    with pytest.raises(DataError, match="mapping.txt: " + re.escape(expected)):
        load_splits(DataConfig(source=source, eval_split="train"), seed=0)


def test_labels_from_one_train_a_two_class_head_and_evaluate_reads_them_back(tiny_bert, tiny_data, tmp_path):
    # a pretrained 2-class head fits 1/2 labels (it was refused: "does not fit the 3 classes"), and
    # launch/evaluate.py maps the file's 1/2 onto tuned/'s classes "1", "2" by name
    data = tmp_path / "one_two"
    data.mkdir()
    for split in ("train", "test"):
        frame = pd.read_parquet(f"{tiny_data}/{split}.parquet")
        frame["label"] += 1
        frame.to_csv(data / f"{split}.csv", index=False)
    out = tmp_path / "out"
    p = run_cli("launch/train.py", "--recipe", "/dev/null", *tiny_overrides(tiny_bert, str(data), out), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["tuned"]["labels"] == ["1", "2"] and m["data"]["labels"] == ["1", "2"]
    assert json.loads((out / "tuned" / "config.json").read_text())["id2label"] == {"0": "1", "1": "2"}
    p = run_cli("launch/evaluate.py", "--model", out / "tuned", "--data", data, "--max-length", "32", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["accuracy"] == m["tuned"]["accuracy"]

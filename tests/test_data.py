import numpy as np
import pandas as pd
import pytest

import tiny
from engine.config import DataConfig
from engine.data import Examples, collate, eval_batches, load_splits, stratified_subset, tokenize, train_steps
from engine.errors import DataError


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
    assert sorted(zip(s.train.texts, s.train.labels.tolist()))[0] == ("neg review 0", 0)
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
    pd.DataFrame({"text": [f"review number {i}" for i in range(100)], "label": [i % 2 for i in range(100)]}).to_csv(f, index=False)
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


# ---- batching -----------------------------------------------------------------------------------

def _lengths(n=400, seed=0):
    return np.random.default_rng(seed).integers(5, 300, size=n)


def test_one_process_and_two_ranks_see_the_same_examples_per_step():
    lengths = _lengths()
    single = train_steps(lengths, batch_size=8, grad_accum=2, epoch=0, seed=1, world=1, rank=0)
    r0 = train_steps(lengths, batch_size=4, grad_accum=2, epoch=0, seed=1, world=2, rank=0)
    r1 = train_steps(lengths, batch_size=4, grad_accum=2, epoch=0, seed=1, world=2, rank=1)
    # global step size 16 in both: same steps, same examples, ranks disjoint
    assert len(single) == len(r0) == len(r1) == 400 // 16
    for s, a, b in zip(single, r0, r1):
        mine = np.concatenate(a), np.concatenate(b)
        assert not set(mine[0].tolist()) & set(mine[1].tolist())
        assert sorted(np.concatenate(s).tolist()) == sorted(np.concatenate(mine).tolist())


def test_epochs_reshuffle_and_drop_only_the_incomplete_step():
    lengths = _lengths(100)
    e0 = np.concatenate([np.concatenate(m) for m in train_steps(lengths, 8, 1, epoch=0, seed=1)])
    e1 = np.concatenate([np.concatenate(m) for m in train_steps(lengths, 8, 1, epoch=1, seed=1)])
    assert len(e0) == len(set(e0.tolist())) == 96
    assert e0.tolist() != e1.tolist()


def test_length_grouping_cuts_padding():
    lengths = _lengths(2000)

    def padding(group):
        plan = train_steps(lengths, 16, 1, epoch=0, seed=0, group_by_length=group)
        padded = sum(len(b) * lengths[b].max() for m in plan for b in m)
        return 1 - lengths[np.concatenate([b for m in plan for b in m])].sum() / padded

    assert padding(True) < 0.1 < padding(False)


def test_eval_batches_cover_every_example_once_across_ranks():
    lengths = _lengths(101)
    got = np.concatenate([np.concatenate(eval_batches(lengths, 8, world=3, rank=r)) for r in range(3)])
    assert sorted(got.tolist()) == list(range(101))


def test_collate_pads_right_or_left():
    from engine.data import Tokenized
    data = Tokenized([np.array([5, 6, 7], np.int32), np.array([9], np.int32)], np.array([1, 0]))
    b = collate(data, np.array([0, 1]), pad_id=0, multiple_of=4)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    b = collate(data, np.array([0, 1]), pad_id=0, pad_left=True, multiple_of=1)
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9]] and b["labels"].tolist() == [1, 0]


def test_tokenize_is_cached(tmp_path):
    tok = tiny.make_tokenizer()
    ex = Examples(["good movie", "bad film indeed"], np.array([1, 0]), "x")
    first = tokenize(ex, tok, 16, str(tmp_path))
    assert len(list(tmp_path.glob("*.npz"))) == 1
    calls = []
    tok_call = tok.__class__.__call__
    tok.__class__.__call__ = lambda self, *a, **k: calls.append(1) or tok_call(self, *a, **k)
    try:
        second = tokenize(ex, tok, 16, str(tmp_path))
    finally:
        tok.__class__.__call__ = tok_call
    assert calls == []  # served from the cache
    assert [x.tolist() for x in first.ids] == [x.tolist() for x in second.ids]
    assert tokenize(ex, tok, 2, str(tmp_path)).ids[1].tolist() != first.ids[1].tolist()  # max_length is in the key


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

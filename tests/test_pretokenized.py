"""A pre-tokenized source: a split whose `input_ids` column (lists of token ids) replaces the text.
Its ids reach the token store as they are, with no tokenizer call, and train exactly as the text
they came from."""
import json

import numpy as np
import pandas as pd
import pytest

import tiny
from conftest import tiny_overrides
from engine.batching import tokenize
from engine.config import DataConfig
from engine.errors import DataError
from engine.finetune import finetune
from engine.recipe_yaml import load_recipe
from engine.sources import load_splits


def pretokenize(text_folder, out_folder, tokenizer, max_length: int) -> str:
    """The text source's splits as `datasets.map(tokenizer)` users write them: input_ids + label."""
    out_folder.mkdir()
    for split in ("train", "test"):
        frame = pd.read_parquet(f"{text_folder}/{split}.parquet")
        ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in frame.text]
        pd.DataFrame({"input_ids": ids, "label": frame.label}).to_parquet(out_folder / f"{split}.parquet")
    return str(out_folder)


def test_ids_go_to_the_store_without_a_tokenizer_call(tiny_data, tmp_path, monkeypatch):
    tok = tiny.make_tokenizer()
    folder = pretokenize(tiny_data, tmp_path / "ids", tok, 32)
    text = load_splits(DataConfig(source=tiny_data, train_size=50), seed=3)
    ids = load_splits(DataConfig(source=folder, train_size=50), seed=3)
    assert ids.train.pretokenized and not text.train.pretokenized
    assert ids.train.labels.tolist() == text.train.labels.tolist() and ids.label_names == text.label_names
    want = [x.tolist() for x in tokenize(text.train, tok, 32, str(tmp_path / "a")).ids]

    def no_call(*a, **k):
        raise AssertionError("the tokenizer was called")

    monkeypatch.setattr(type(tok), "__call__", no_call)
    monkeypatch.setattr(type(tok), "backend_tokenizer", property(no_call))
    got = tokenize(ids.train, tok, 32, str(tmp_path / "b"))
    assert [x.tolist() for x in got.ids] == want
    again = tokenize(ids.train, tok, 32, str(tmp_path / "b"))  # from the store
    assert [x.tolist() for x in again.ids] == want


def test_trains_exactly_as_the_text_it_came_from(tiny_bert, tiny_data, tmp_path):
    from transformers import AutoTokenizer

    folder = pretokenize(tiny_data, tmp_path / "ids", AutoTokenizer.from_pretrained(tiny_bert), 32)
    reports = [finetune(load_recipe(None, tiny_overrides(tiny_bert, source, tmp_path / name) + ["train.epochs=1"]))
               for name, source in (("text", tiny_data), ("ids", folder))]
    for key in ("accuracy", "loss", "sha256"):
        assert reports[0]["tuned"][key] == reports[1]["tuned"][key], key
    logs = [(tmp_path / name / "log.jsonl").read_text().splitlines() for name in ("text", "ids")]
    assert [json.loads(x).get("train/loss") for x in logs[0]] == [json.loads(x).get("train/loss") for x in logs[1]]


def _ids_file(tmp_path, rows) -> str:
    pd.DataFrame({"input_ids": rows, "label": [i % 2 for i in range(len(rows))]}).to_parquet(tmp_path / "train.parquet")
    return str(tmp_path / "train.parquet")


def test_ids_longer_than_max_length_name_file_and_row(tmp_path):
    src = _ids_file(tmp_path, [[2, 5, 3], [2] + [5] * 40 + [3], [2, 6, 3], [2, 7, 3]])
    s = load_splits(DataConfig(source=src, eval_split=None, holdout_size=1), seed=0)
    part = s.train if 2 in s.train.rows else s.eval
    with pytest.raises(DataError, match=r"train.parquet.*: row 2, column 'input_ids': 42 token ids, more than "
                                        r"data.max_length=32"):
        tokenize(part, tiny.make_tokenizer(), 32, str(tmp_path / "c"))
    assert not list((tmp_path / "c").glob("*.json"))  # no store is left to trust


@pytest.mark.parametrize("rows, bad", [([[2, 5, 3], [], [2, 6, 3]], 2), ([[2, 5, 3], [2, 6, 3], [3, -1]], 3),
                                       ([["a", "b"], ["c"], ["d"]], 1)])
def test_bad_id_cells_name_file_and_row(tmp_path, rows, bad):
    src = _ids_file(tmp_path, rows)
    with pytest.raises(DataError, match=rf"train.parquet: row {bad}, column 'input_ids': expected a non-empty list"):
        load_splits(DataConfig(source=src, eval_split=None, holdout_size=1), seed=0)


def test_ids_outside_the_vocabulary_are_refused(tmp_path):
    src = _ids_file(tmp_path, [[2, 5, 3], [2, 10**6, 3], [2, 6, 3]])
    s = load_splits(DataConfig(source=src, eval_split=None, holdout_size=1), seed=0)
    with pytest.raises(DataError, match="outside the tokenizer's vocabulary"):
        tokenize(s.train if 2 in s.train.rows else s.eval, tiny.make_tokenizer(), 32, str(tmp_path / "c"))


def test_a_text_column_wins_over_input_ids(tmp_path):
    pd.DataFrame({"text": ["good", "bad"], "input_ids": [[1], [2]], "label": [1, 0]}).to_parquet(tmp_path / "t.parquet")
    s = load_splits(DataConfig(source=str(tmp_path / "t.parquet"), eval_split=None, holdout_size=1), seed=0)
    assert not s.train.pretokenized and np.asarray(list(s.train.texts) + list(s.eval.texts)).dtype.kind == "U"

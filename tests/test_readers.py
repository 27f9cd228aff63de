"""Reading files (engine/readers.py): cells read as the text they are, empty files and cells named in one line,
and data.where comparing a CSV's text cells with a recipe's numbers."""
import pandas as pd
import pytest

from engine.config import DataConfig
from engine.errors import DataError
from engine.readers import read_table
from engine.sources import load_splits

WORDS = ["NA", "null", "None", "nan", "N/A", "NaN", "#N/A", "NULL", "n/a", "<NA>"]


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "tsv", "parquet"])
def test_an_empty_file_is_one_line_naming_it(tmp_path, suffix):
    (tmp_path / f"train.{suffix}").write_bytes(b"")
    with pytest.raises(DataError, match=rf"train.{suffix}: the file is empty"):
        read_table(tmp_path / f"train.{suffix}", "utf-8")  # predict's --input, compare's phrases_file
    with pytest.raises(DataError, match=rf"train.{suffix}: the file is empty"):
        load_splits(DataConfig(source=str(tmp_path), eval_split="train"), seed=0)


def test_blank_json_lines_are_no_rows(tmp_path):
    (tmp_path / "in.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"in.jsonl: no rows"):
        read_table(tmp_path / "in.jsonl", "utf-8")


@pytest.mark.parametrize("sep, suffix", [(",", "csv"), ("\t", "tsv")])
def test_words_pandas_takes_for_missing_are_text_an_empty_cell_is_missing(tmp_path, sep, suffix):
    # a review that says "NA" or "None" stopped the run as "expected text, got nan"
    lines = ["text" + sep + "label"] + [f"{w}{sep}{['neg', 'NA'][i % 2]}" for i, w in enumerate(WORDS)]
    (tmp_path / f"train.{suffix}").write_text("\n".join(lines) + "\n")
    s = load_splits(DataConfig(source=str(tmp_path), eval_split="train"), seed=0)
    assert list(s.train.texts) == WORDS
    assert s.label_names == ["NA", "neg"] and s.train.labels.tolist() == [1, 0] * 5  # a label can be "NA" too
    assert read_table(tmp_path / f"train.{suffix}", "utf-8")["text"].tolist() == WORDS
    # a truly empty cell is still missing, named with its file, row and column
    (tmp_path / f"train.{suffix}").write_text(f"text{sep}label\ngood{sep}1\n{sep}0\nbad{sep}0\n")
    with pytest.raises(DataError, match=rf"train.{suffix}: row 2, column 'text': expected text, got an empty cell"):
        load_splits(DataConfig(source=str(tmp_path), eval_split="train"), seed=0)
    (tmp_path / f"train.{suffix}").write_text(f"text{sep}label\ngood{sep}1\nmeh{sep}\nbad{sep}0\n")
    with pytest.raises(DataError, match=rf"train.{suffix}: row 2, column 'label': missing label"):
        load_splits(DataConfig(source=str(tmp_path), eval_split="train"), seed=0)


def test_where_on_a_number_matches_csv_cells(tmp_path):
    # CSV and TSV cells are text: `data.where: {stars: 5}` never matched "5", and the split was empty
    frame = pd.DataFrame({"text": [f"review {i}" for i in range(12)], "label": [i % 2 for i in range(12)],
                          "stars": [5, 1, 5, 3] * 3, "verified": ["true", "False", "True", "false"] * 3,
                          "score": [0.5, 1.0, 0.5, 2.0] * 3})
    for suffix in ("csv", "tsv", "jsonl", "parquet"):
        folder = tmp_path / suffix
        folder.mkdir()
        if suffix == "parquet":
            frame.to_parquet(folder / "train.parquet")
        elif suffix == "jsonl":
            frame.to_json(folder / "train.jsonl", orient="records", lines=True)
        else:
            frame.to_csv(folder / f"train.{suffix}", index=False, sep="," if suffix == "csv" else "\t")
        for where, rows in (({"stars": 5}, [0, 2, 4, 6, 8, 10]), ({"stars": "5"}, [0, 2, 4, 6, 8, 10]),
                            ({"verified": True}, [0, 2, 4, 6, 8, 10]), ({"score": 2.0}, [3, 7, 11]),
                            ({"stars": 5, "verified": False}, [])):
            cfg = DataConfig(source=str(folder), eval_split="train", where=where)
            if not rows:
                with pytest.raises(DataError, match="split 'train' is empty after data.where"):
                    load_splits(cfg, seed=0)
                continue
            s = load_splits(cfg, seed=0)
            assert list(s.train.texts) == [f"review {i}" for i in rows], (suffix, where)

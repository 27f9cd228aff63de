"""Class names and label ids (engine/labels.py): one rule names the classes and looks labels up, so no
class is made that no label reaches."""
import numpy as np
import pandas as pd
import pytest

from engine.config import DataConfig, ModelConfig
from engine.errors import DataError
from engine.metrics import classification_metrics
from engine.modeling import load_model
from engine.sources import load_eval_split, load_splits

TRAIN = ["Positive", "positive", "negative", "Negative"] * 5
TEST = ["negative", "POSITIVE", " Negative ", "positive"]


def _csv(folder, train=TRAIN, test=TEST):
    folder.mkdir(parents=True, exist_ok=True)
    for split, labels in (("train", train), ("test", test)):
        pd.DataFrame({"text": [f"review {i}" for i in range(len(labels))], "label": labels}).to_csv(
            folder / f"{split}.csv", index=False)
    return str(folder)


def test_labels_differing_only_in_case_are_one_class(tmp_path, tiny_bert):
    # they were 4 classes, 2 of which no label reached: a perfect classifier scored macro-F1 0.5,
    # and a pretrained 2-class head was refused as not fitting "the 4 classes of the data"
    s = load_splits(DataConfig(source=_csv(tmp_path)), seed=0)
    assert s.label_names == ["Negative", "Positive"]  # each named by its spelling that sorts first
    assert s.train.labels.tolist() == [1, 1, 0, 0] * 5 and s.eval.labels.tolist() == [0, 1, 0, 1]
    perfect = np.eye(2)[s.eval.labels] * 5
    assert classification_metrics(perfect, s.eval.labels, s.label_names)["f1"] == 1.0
    assert load_model(ModelConfig(name_or_path=tiny_bert), s.label_names).config.num_labels == 2
    # data.label_names in another case: the recipe's order and spelling, every label reaching its class
    s = load_splits(DataConfig(source=_csv(tmp_path), label_names=["POSITIVE", "NEGATIVE"]), seed=0)
    assert s.label_names == ["POSITIVE", "NEGATIVE"]
    assert s.train.labels.tolist() == [0, 0, 1, 1] * 5 and s.eval.labels.tolist() == [1, 0, 1, 0]


def test_class_names_that_no_label_could_tell_apart_are_refused(tmp_path):
    # evaluate.py maps a file's labels onto a model's names: two that differ in case only are one line
    with pytest.raises(DataError, match=r"test.csv: class names 'pos' and 'POS' differ only in case"):
        load_eval_split(DataConfig(source=_csv(tmp_path)), "test", ["neg", "pos", "POS"])

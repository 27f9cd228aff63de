"""data.truncation: which tokens of a long text are kept, with the tokenizer's own special tokens."""
import json
import random

import numpy as np
import pandas as pd
import pytest

import tiny
from conftest import tiny_overrides
from engine.batching import tokenize
from engine.config import RecipeError
from engine.errors import DataError
from engine.finetune import finetune
from engine.recipe_yaml import load_recipe
from engine.sources import Examples

WORDS = sorted(set(tiny.FILLER + tiny.POSITIVE + tiny.NEGATIVE))[:20]  # 20 distinct in-vocabulary words


def ids_of(tok, words):
    return tok(" ".join(words), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("truncation, head", [("head_tail", 3), ("tail", 0)])
def test_layout_bert_like(tmp_path, truncation, head):
    tok = tiny.make_tokenizer()
    cls, sep = tok.cls_token_id, tok.sep_token_id
    body = ids_of(tok, WORDS)
    assert len(body) == 20
    ex = Examples([" ".join(WORDS)], np.array([1]), "x")
    got = tokenize(ex, tok, 10, str(tmp_path), truncation=truncation, head_tokens=head).ids[0].tolist()
    # 10 tokens: [CLS], the first `head`, the last 8 - head, [SEP]
    assert got == [cls] + body[:head] + body[20 - (8 - head):] + [sep]


def test_layout_tokenizer_without_special_tokens(tmp_path):
    tok = tiny.make_bpe_tokenizer()  # Qwen2-style byte-level BPE: no BOS/EOS added
    text = " ".join(WORDS)
    body = tok(text, add_special_tokens=False)["input_ids"]
    assert len(body) > 12
    got = tokenize(Examples([text], np.array([0]), "x"), tok, 12, str(tmp_path),
                   truncation="head_tail", head_tokens=5).ids[0].tolist()
    assert got == body[:5] + body[-7:]


def test_short_texts_are_kept_whole_and_match_head(tmp_path):
    tok = tiny.make_tokenizer()
    ex = Examples(["good movie", "bad film indeed"], np.array([1, 0]), "x")
    head = tokenize(ex, tok, 16, str(tmp_path))
    for mode in ("tail", "head_tail"):
        other = tokenize(ex, tok, 16, str(tmp_path), truncation=mode, head_tokens=4)
        assert [x.tolist() for x in other.ids] == [x.tolist() for x in head.ids]


def test_cache_is_keyed_on_truncation(tmp_path):
    tok = tiny.make_tokenizer()
    ex = Examples([" ".join(WORDS)], np.array([1]), "x")
    a = tokenize(ex, tok, 10, str(tmp_path)).ids[0].tolist()
    b = tokenize(ex, tok, 10, str(tmp_path), truncation="head_tail", head_tokens=3).ids[0].tolist()
    c = tokenize(ex, tok, 10, str(tmp_path), truncation="head_tail", head_tokens=5).ids[0].tolist()
    assert a != b != c
    assert len(list(tmp_path.glob("*.json"))) == 3  # three token stores (their headers)


def test_no_room_for_the_tail(tmp_path):
    tok = tiny.make_tokenizer()
    ex = Examples([" ".join(WORDS)], np.array([1]), "x")
    with pytest.raises(DataError, match="no room for a tail"):  # 8 - 2 special tokens - 6 = 0
        tokenize(ex, tok, 8, str(tmp_path), truncation="head_tail", head_tokens=6)
    with pytest.raises(RecipeError, match="head_tokens"):
        load_recipe(None, ["data.truncation=head_tail", "data.max_length=64", "data.head_tokens=64"])
    with pytest.raises(RecipeError, match="must be one of"):
        load_recipe(None, ["data.truncation=middle"])


def verdict_last_data(folder, n_train=192, n_test=64, seed=0):
    """20 random filler words, then one sentiment word: the label is only in the last word."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [i % 2 for i in range(n)]
        texts = [" ".join([rng.choice(tiny.FILLER) for _ in range(20)]
                          + [rng.choice(tiny.POSITIVE if y else tiny.NEGATIVE)]) for y in labels]
        pd.DataFrame({"text": texts, "label": labels}).to_parquet(folder / f"{split}.parquet")
    return str(folder)


def test_verdict_at_the_end_is_learnable_with_head_tail_only(tiny_bert, tmp_path):
    data = verdict_last_data(tmp_path / "data")
    accuracy = {}
    for mode in ("head", "head_tail"):
        out = tmp_path / mode
        over = tiny_overrides(tiny_bert, data, out) + [
            "data.max_length=8", f"data.truncation={mode}", "data.head_tokens=2", "train.epochs=4"]
        finetune(load_recipe(None, over))
        accuracy[mode] = json.loads((out / "metrics.json").read_text())["tuned"]["accuracy"]
    assert accuracy["head_tail"] > 0.95, accuracy
    assert accuracy["head"] < 0.75, accuracy  # the first 6 words are filler: chance level

"""The real all-MiniLM-L6-v2 (pip package) on the real IMDB parquet files in ../shared/data."""
import json

import numpy as np

from conftest import SHARED_DATA, needs_minilm, needs_shared_data, run_cli
from engine.recipe_yaml import load_recipe
from engine.sources import load_splits


@needs_shared_data()
@needs_minilm()
def test_real_minilm_learns_the_shared_imdb_reviews_it_trains_on(tmp_path):
    # 32 real reviews, 5 passes over them: too few to generalise far, enough that a model which
    # really trains classifies the reviews it saw well above chance (0.5, the classes balanced)
    out = tmp_path / "run"
    p = run_cli("launch/train.py", "--recipe", "recipes/imdb_minilm_local.yaml", f"output_dir={out}",
                f"data.source={SHARED_DATA / 'imdb'}", "data.train_size=32", "data.holdout_size=32",
                "data.test_size=32", "data.max_length=128", "train.batch_size=8", "train.max_steps=20", "train.lr=3e-4",
                "train.log_every=4", "checkpoint.keep=0", timeout=1200)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["base"]["n"] == m["tuned"]["n"] == m["dev"]["tuned"]["n"] == 32  # test and dev, as the recipe says
    assert m["train"]["steps"] == 20 and m["train"]["samples"] == 160
    assert m["base"]["sha256"] != m["tuned"]["sha256"]
    assert m["data"]["labels"] == ["negative", "positive"]

    # the tuned snapshot, through a plain transformers pipeline, on the very reviews it trained on
    from transformers import pipeline
    recipe = load_recipe(out / "recipe.yaml")
    train = load_splits(recipe.data, recipe.seed).train
    clf = pipeline("text-classification", model=str(out / "tuned"), truncation=True, max_length=128)
    predicted = [r["label"] for r in clf(list(train.texts), batch_size=8)]
    gold = [m["data"]["labels"][y] for y in train.labels]
    assert sorted(set(gold)) == ["negative", "positive"] and len(gold) == 32
    accuracy = float(np.mean([p == g for p, g in zip(predicted, gold, strict=True)]))
    assert accuracy >= 0.8, accuracy

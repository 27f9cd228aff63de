"""The Trainer baseline on a pre-tokenized source (benchmarks/gpu_material.py's layout: `input_ids` and
`label` columns): the engine's selection of rows, the stored ids trained as they are, no tokenizer call."""
import json
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from test_harness import run_trainer_runner

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import trainer_baseline  # noqa: E402

SELECTION = ["data.holdout_size=32", "data.eval_split=null", "data.test_split=test"]


def pretokenize(folder, data, model, keep=None) -> dict:
    """Each split of `data` as `input_ids` (the model's tokenizer, cut at 32; or the first `keep` ids)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    folder.mkdir()
    stored = {}
    for split in ("train", "test"):
        frame = pd.read_parquet(f"{data}/{split}.parquet")
        ids = tok(frame["text"].tolist(), truncation=True, max_length=32)["input_ids"]
        ids = [x[:keep] for x in ids] if keep else ids
        table = pa.table({"input_ids": pa.array(ids, pa.list_(pa.uint16())), "label": frame["label"].tolist()})
        pq.write_table(table, folder / f"{split}.parquet", compression="zstd")
        stored[split] = ids
    return stored


def test_pretokenized_source_selects_the_engines_rows(tmp_path, tiny_bert, tiny_data):
    """Holdout, train and test: the same rows, in the same order, as the engine picks from the text."""
    from transformers import AutoTokenizer

    ids_source = tmp_path / "ids"
    pretokenize(ids_source, tiny_data, tiny_bert)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    settings = {"model": tiny_bert, "max_length": 32}
    text, none = trainer_baseline.load_examples({**settings, "data_overrides": [f"data.source={tiny_data}",
                                                                                 *SELECTION]}, tmp_path / "a")
    splits, ids = trainer_baseline.load_examples({**settings, "data_overrides": [f"data.source={ids_source}",
                                                                                  *SELECTION]}, tmp_path / "b")
    assert none is None and set(ids) == {"train", "eval", "test"}
    for part in ("train", "eval", "test"):
        expected = getattr(text, part)
        assert ids[part] == tok(list(expected.texts), truncation=True, max_length=32)["input_ids"], part
        assert np.array_equal(getattr(splits, part).labels, expected.labels), part
        assert str(ids_source) in getattr(splits, part).origin  # messages name the source, not the stand-in
    assert (len(ids["train"]), len(ids["eval"]), len(ids["test"])) == (160, 32, 33)
    assert splits.label_names == text.label_names


def test_trainer_runner_trains_the_stored_ids_and_scores_the_test_split(tmp_path, tiny_bert, tiny_data):
    """Ids cut to 5 tokens, which the tokenizer would never produce from the text: the runner trains
    exactly those tokens (the tally), and its closing evaluation is on the 33 test reviews."""
    ids_source = tmp_path / "ids"
    stored = pretokenize(ids_source, tiny_data, tiny_bert, keep=5)
    run = run_trainer_runner(tmp_path / "run", tiny_bert, {"source": str(ids_source), "holdout_size": 32,
                                                           "eval_split": None, "test_split": "test"},
                             epochs=1, eval_every=10)
    assert run["pretokenized"] and run["final_split"] == "test" and run["eval_n"] == 33
    assert run["train_n"] == 160 and run["micro_batches"] == 20
    kept = set(range(192)) - set(_held_out(tiny_data))
    assert run["timeline"][-1][3] == sum(len(stored["train"][i]) for i in kept)  # real tokens: the stored ones
    assert run["final"]["accuracy"] is not None
    assert [e["step"] for e in run["evals"] if e["accuracy"] is not None] == [10, 20]  # dev only: test is apart


def _held_out(data) -> list[int]:
    from engine.sources import stratified_subset

    labels = pd.read_parquet(f"{data}/train.parquet")["label"].to_numpy()
    return stratified_subset(labels, 32, 42).tolist()


def test_trainer_runner_lora_adapts_the_layers_the_engine_adapts(tmp_path, tiny_bert, tiny_data):
    """method lora: the Trainer with peft, the engine's LoraConfig (rank, targets, whole head) from the
    scenario's peft.* keys: the same trainable parameter count as the engine's own LoRA run."""
    from conftest import run_cli, tiny_overrides

    peft = ["peft.method=lora", "peft.r=4", "peft.target_modules=[query,value,key]"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# overrides only\n")
    p = run_cli("launch/train.py", "--recipe", recipe, *tiny_overrides(tiny_bert, tiny_data, tmp_path / "engine"),
                "train.max_steps=2", *peft, env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    engine = json.loads((tmp_path / "engine" / "metrics.json").read_text())["params"]
    run = run_trainer_runner(tmp_path / "trainer", tiny_bert, tiny_data, steps=3, method="lora",
                             recipe={"peft.r": 4, "peft.target_modules": ["query", "value", "key"]})
    assert run["params"]["trainable_params"] == engine["trainable_params"] < run["params"]["total_params"]

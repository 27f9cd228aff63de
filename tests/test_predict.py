"""launch/predict.py: labels a file of texts with the scores launch/evaluate.py gives, in input order,
from tuned/, adapter/ or under torchrun alike."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

import tiny
from conftest import run_cli, tiny_overrides
from engine.finetune import finetune
from engine.recipe_yaml import load_recipe


@pytest.fixture(scope="module")
def lora_run(tiny_data, tmp_path_factory):
    """A tiny LoRA run: tuned/ (merged) and adapter/ beside base/. Random weights large enough that
    adapters on a frozen random body learn the task (see tiny.make_model)."""
    model = tiny.make_model(tmp_path_factory.mktemp("bert"), "bert", init_range=0.1)
    out = tmp_path_factory.mktemp("lora")
    finetune(load_recipe(None, tiny_overrides(model, tiny_data, out) + [
        "peft.method=lora", "train.epochs=6", "train.lr=1e-2", "train.precision=fp32"]))
    return out


def _predict(*args):
    return run_cli("launch/predict.py", "--precision", "fp32", "--threads", "1", "--max-length", "128", *args)


def _scores(model, tokenizer_dir, texts):
    """Each text scored alone (no batching, no sorting): what row i of the output must say."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    m = AutoModelForSequenceClassification.from_pretrained(model).eval()
    with torch.inference_mode():
        return np.stack([torch.softmax(m(**tok(t, return_tensors="pt")).logits[0], -1).numpy() for t in texts])


def test_accuracy_equals_evaluate_and_rows_keep_input_order(lora_run, tiny_data, tmp_path):
    tuned = lora_run / "tuned"
    ev = run_cli("launch/evaluate.py", "--model", tuned, "--data", tiny_data, "--split", "test",
                 "--max-length", "128", "--output", tmp_path / "eval.json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    p = _predict("--model", tuned, "--input", f"{tiny_data}/test.parquet", "--output", tmp_path / "pred.csv")
    assert p.returncode == 0, p.stderr[-2000:]
    truth = pd.read_parquet(f"{tiny_data}/test.parquet")
    pred = pd.read_csv(tmp_path / "pred.csv")
    assert len(pred) == len(truth) == evaluated["n"]
    names = evaluated["labels"]
    gold = [names[y] for y in truth["label"]]
    accuracy = float((pred["label"].to_numpy() == np.array(gold)).mean())
    assert accuracy == evaluated["accuracy"]  # to the last digit
    assert accuracy > 0.6  # it learned: a broken label order would not agree by chance
    # the batches ran longest first; each row is still its own input's score
    alone = _scores(tuned, tuned, truth["text"])
    probs = pred[[f"prob_{n}" for n in names]].to_numpy()
    np.testing.assert_allclose(probs, alone, atol=1e-5)
    assert list(pred["label"]) == [names[i] for i in alone.argmax(-1)]
    np.testing.assert_allclose(pred["probability"], alone.max(-1), atol=1e-5)


def test_adapter_folder_labels_as_tuned_does(lora_run, tiny_data, tmp_path):
    texts = pd.read_parquet(f"{tiny_data}/test.parquet")["text"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    outs = {}
    for name in ("tuned", "adapter"):
        p = _predict("--model", lora_run / name, "--input", tmp_path / "in.txt", "--output", tmp_path / f"{name}.jsonl")
        assert p.returncode == 0, p.stderr[-2000:]
        outs[name] = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert len(outs["adapter"]) == len(texts)
    assert [r["label"] for r in outs["adapter"]] == [r["label"] for r in outs["tuned"]]
    for a, t in zip(outs["adapter"], outs["tuned"], strict=True):
        assert a["probs"] == pytest.approx(t["probs"], abs=1e-5)


def test_an_adapter_moved_away_from_its_run_needs_base(lora_run, tiny_data, tmp_path):
    import shutil
    moved = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(lora_run / "adapter", moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "in.txt").write_text("good film\nbad film\n")
    p = _predict("--model", moved, "--input", tmp_path / "in.txt", "--output", tmp_path / "o.csv")
    assert p.returncode == 2 and "cannot load" in p.stderr and not (tmp_path / "o.csv").exists()
    p = _predict("--model", moved, "--base", lora_run / "base", "--input", tmp_path / "in.txt",
                 "--output", tmp_path / "o.csv")
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(pd.read_csv(tmp_path / "o.csv")) == 2


def test_two_processes_write_the_same_file_as_one(lora_run, tiny_data, tmp_path):
    args = ["--model", lora_run / "tuned", "--input", f"{tiny_data}/test.parquet", "--batch-size", "5"]
    one = _predict(*args, "--output", tmp_path / "one.csv")
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/predict.py",
                  "--precision", "fp32", "--threads", "1", "--max-length", "128", *args,
                  "--output", tmp_path / "two.csv")
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()


def test_bad_input_is_one_line_and_exit_2(lora_run, tmp_path):
    tuned = lora_run / "tuned"
    pd.DataFrame({"review": ["good", "bad"]}).to_csv(tmp_path / "in.csv", index=False)
    p = _predict("--model", tuned, "--input", tmp_path / "in.csv", "--output", tmp_path / "o.csv")
    assert p.returncode == 2 and "no column 'text'" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    pd.DataFrame({"text": ["good", None]}).to_parquet(tmp_path / "gap.parquet")
    p = _predict("--model", tuned, "--input", tmp_path / "gap.parquet", "--output", tmp_path / "o.csv")
    assert p.returncode == 2 and "row 2" in p.stderr
    p = _predict("--model", tuned, "--input", tmp_path / "in.csv", "--text-column", "review",
                 "--output", tmp_path / "o.xlsx")
    assert p.returncode == 2 and ".csv or .jsonl" in p.stderr
    # past the tiny model's 128 positions: refused before any text is scored
    p = _predict("--model", tuned, "--input", tmp_path / "in.csv", "--text-column", "review",
                 "--output", tmp_path / "o.csv", "--max-length", "129")
    assert p.returncode == 2 and "past the 128 positions" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not any(x.name.startswith(("o.", ".o.")) for x in tmp_path.iterdir())  # nothing half-written


def test_an_existing_output_is_kept_unless_overwrite(lora_run, tmp_path):
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    (tmp_path / "in.txt").write_text("good film\nbad film\nfine\n")
    out = tmp_path / "o.csv"
    out.write_text("precious\n")
    p = _predict("--model", lora_run / "tuned", "--input", tmp_path / "in.txt", "--output", out)
    assert p.returncode == 2 and "--overwrite" in p.stderr and out.read_text() == "precious\n"
    p = _predict("--model", lora_run / "tuned", "--input", tmp_path / "in.txt", "--output", out, "--overwrite")
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(pd.read_csv(out)) == 3
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "o.csv"]  # no temporary file left

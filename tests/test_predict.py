"""launch/predict.py: labels a file of texts with the scores launch/evaluate.py gives, in input order,
from tuned/, adapter/ or under torchrun alike, a chunk at a time; an adapter only on its own base."""
import json
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import tiny
from conftest import run_cli, tiny_overrides
from engine import readers
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
    """As a user types it: the cut and precision come from the run (its run_settings.json)."""
    return run_cli("launch/predict.py", "--threads", "1", *args)


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
                 "--output", tmp_path / "eval.json")
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
                  "--threads", "1", *args, "--output", tmp_path / "two.csv")
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


def test_evaluate_takes_an_adapter_folder_as_predict_does(lora_run, tiny_data, tmp_path):
    scores = {}
    for name in ("tuned", "adapter"):
        p = run_cli("launch/evaluate.py", "--model", lora_run / name, "--data", tiny_data, "--split", "test",
                    "--max-length", "32", "--output", tmp_path / f"{name}.json")
        assert p.returncode == 0, p.stderr[-2000:]
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert scores["adapter"]["n"] == scores["tuned"]["n"] == 33
    assert scores["adapter"]["accuracy"] == scores["tuned"]["accuracy"]
    assert scores["adapter"]["loss"] == pytest.approx(scores["tuned"]["loss"], rel=1e-5)
    assert scores["adapter"]["base"] == str(lora_run / "base")


def test_an_adapter_goes_on_its_own_runs_base_first_and_never_on_another(lora_run, tmp_path, monkeypatch):
    # the engine names base/ relative to where training ran; from a folder holding another run of
    # that name, that name is another model of the same shapes
    from engine.errors import ModelError
    from engine.prediction import label_file
    run = tmp_path / "x" / "runs" / "demo"
    for name in ("adapter", "base"):
        shutil.copytree(lora_run / name, run / name)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "runs/demo/base"
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    here = tmp_path / "y"
    decoy = tiny.make_model(here / "runs" / "demo" / "base", "bert", init_range=0.1, seed=1)
    (tmp_path / "in.txt").write_text("good film\nbad film\nthe plot was dull\n")
    monkeypatch.chdir(here)

    def predict(model, output, **kw):
        return label_file(str(model), tmp_path / "in.txt", tmp_path / output, num_threads=1, **kw)

    assert predict(run / "adapter", "a.jsonl")["base"] == str(run / "base")  # the summary names the base used
    predict(lora_run / "tuned", "t.jsonl")
    rows = {n: [json.loads(x) for x in (tmp_path / f"{n}.jsonl").read_text().splitlines()] for n in ("a", "t")}
    for a, t in zip(rows["a"], rows["t"], strict=True):
        assert a["probs"] == pytest.approx(t["probs"], abs=1e-5)
    for base in (decoy, None):  # asked for, or the only one left once its own base/ is gone
        if base is None:
            shutil.rmtree(run / "base")
        with pytest.raises(ModelError, match="trained on a base whose weights have sha256"):
            predict(run / "adapter", "b.jsonl", base=base)
        assert not any(x.name.startswith(("b.", ".b.")) for x in tmp_path.iterdir())
    p = _predict("--model", run / "adapter", "--base", decoy, "--input", tmp_path / "in.txt",
                 "--output", tmp_path / "b.jsonl")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]


def test_txt_lines_split_on_newline_only(lora_run, tmp_path):
    # str.splitlines also splits on these; real reviews hold them, and every later row would shift
    texts = ["good film\x0cwith a form feed", "bad\x85film", "fine\u2028great\u2029film", "dull\x1cplot\x1d\x1e",
             "written on windows"]
    (tmp_path / "in.txt").write_bytes(("\n".join(texts[:-1]) + "\n" + texts[-1] + "\r\n").encode("utf-8"))
    p = _predict("--model", lora_run / "tuned", "--input", tmp_path / "in.txt", "--output", tmp_path / "o.csv")
    assert p.returncode == 0, p.stderr[-2000:]
    pred = pd.read_csv(tmp_path / "o.csv")
    assert len(pred) == len(texts)
    probs = pred[[c for c in pred.columns if c.startswith("prob_")]].to_numpy()
    np.testing.assert_allclose(probs, _scores(lora_run / "tuned", lora_run / "tuned", texts), atol=1e-5)


def test_keep_columns_copy_input_columns_so_rows_join_back(lora_run, tiny_data, tmp_path):
    from engine.errors import DataError
    from engine.prediction import label_file
    truth = pd.read_parquet(f"{tiny_data}/test.parquet")
    ids = [f"{i:04d}" for i in range(len(truth))][::-1]  # leading zeros: kept as written
    frame = pd.DataFrame({"id": ids, "text": truth["text"], "gold": truth["label"]})
    frame.to_csv(tmp_path / "in.csv", index=False)
    args = ["--model", lora_run / "tuned", "--input", tmp_path / "in.csv", "--keep-columns", "id,gold"]
    assert _predict(*args, "--output", tmp_path / "o.csv").returncode == 0
    pred = pd.read_csv(tmp_path / "o.csv", dtype={"id": str})
    assert list(pred.columns[:3]) == ["id", "gold", "label"] and list(pred["id"]) == ids
    assert _predict(*args, "--output", tmp_path / "o.jsonl").returncode == 0
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ids and list(rows[0]) == ["id", "gold", "label", "probability", "probs"]
    assert [r["label"] for r in rows] == list(pred["label"])
    frame.assign(label=1).to_csv(tmp_path / "clash.csv", index=False)
    (tmp_path / "in.txt").write_text("good film\n")
    for name, keep, message in (("in.csv", ["idx"], "no column 'idx' (--keep-columns)"),
                                ("clash.csv", ["id", "label"], "'label' is a column predict"),
                                ("in.txt", ["id"], "a .txt has no columns")):
        with pytest.raises(DataError, match=re.escape(message)):
            label_file(str(lora_run / "tuned"), tmp_path / name, tmp_path / "bad.csv", keep_columns=keep)
        assert not any(x.name.startswith(("bad.", ".bad.")) for x in tmp_path.iterdir())


def test_the_input_is_read_and_scored_a_chunk_at_a_time(lora_run, tiny_data, tmp_path, monkeypatch):
    # memory holds one chunk of rows (readers.CHUNK_ROWS), not the file: 7 here, to see it on 33 texts
    from engine import prediction
    texts = pd.read_parquet(f"{tiny_data}/test.parquet")["text"]
    pd.DataFrame({"text": texts}).to_parquet(tmp_path / "in.parquet")
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    whole = prediction.label_file(str(lora_run / "tuned"), tmp_path / "in.parquet", tmp_path / "whole.csv",
                                  num_threads=1)
    assert whole["n"] == 33
    seen, real = [], prediction.predict
    monkeypatch.setattr(prediction, "predict", lambda model, data, *a, **kw: seen.append(len(data)) or
                        real(model, data, *a, **kw))
    monkeypatch.setattr(readers, "CHUNK_ROWS", 7)
    for name in ("in.parquet", "in.txt"):
        seen.clear()
        prediction.label_file(str(lora_run / "tuned"), tmp_path / name, tmp_path / f"{name}.csv", num_threads=1)
        assert seen == [7, 7, 7, 7, 5]
        chunked, one = pd.read_csv(tmp_path / f"{name}.csv"), pd.read_csv(tmp_path / "whole.csv")
        assert list(chunked["label"]) == list(one["label"])
        np.testing.assert_allclose(chunked.drop(columns="label").to_numpy(), one.drop(columns="label").to_numpy(),
                                   atol=1e-6)


def test_a_refusal_prints_nothing_before_its_one_line(lora_run, tmp_path):
    # a CPU whose bf16 is emulated: choosing bf16 prints a note, which must not come before a refusal
    from engine.paths import user_cache_dir
    from engine.precision import machine_id
    probe = user_cache_dir() / "precision_probe.json"  # XDG_CACHE_HOME is this test's (conftest), for predict too
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text(json.dumps({f"{machine_id()}|torch {torch.__version__}|threads 1|bf16": 0.2}))
    (tmp_path / "in.txt").write_text("good film\n")
    args = ["--model", lora_run / "tuned", "--input", tmp_path / "in.txt", "--precision", "bf16"]
    p = _predict(*args, "--max-length", "129", "--output", tmp_path / "o.csv")
    assert p.returncode == 2 and p.stdout == "" and len(p.stderr.strip().splitlines()) == 1, p.stdout + p.stderr
    p = _predict(*args, "--output", tmp_path / "o.csv")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "note: --precision=bf16 on this CPU runs matmuls at 0.20x fp32" in p.stderr
    assert "note: --precision bf16 overrides the run's train.precision=fp32" in p.stderr

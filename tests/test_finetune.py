"""A whole run on a tiny model: snapshots, metrics, logs, and the CLI around it."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, tiny_overrides
from engine.config import DataConfig
from engine.errors import OutputDirError
from engine.evaluation import evaluate_pretrained
from engine.finetune import finetune
from engine.recipe_yaml import load_recipe


@pytest.fixture(scope="module")
def run(tiny_bert, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    report = finetune(load_recipe(None, tiny_overrides(tiny_bert, tiny_data, out) + ["train.eval_every=3"]))
    return out, report


def test_metrics_json(run):
    out, report = run
    m = json.loads((out / "metrics.json").read_text())
    assert m == json.loads(json.dumps(report))
    for side in ("base", "tuned"):
        assert {"accuracy", "f1", "loss", "ece", "per_class", "confusion", "sha256"} <= set(m[side])
        assert m[side]["n"] == 33
    assert m["tuned"]["accuracy"] > 0.9 > m["base"]["accuracy"]
    assert m["train"]["samples_per_s"] > 0 and m["train"]["real_tokens_per_s"] > 0
    assert m["train"]["padded_tokens_per_s"] >= m["train"]["real_tokens_per_s"]
    # 192 examples / batch 8 = 24 steps an epoch: every 3 steps, and at each epoch end (not twice)
    assert [e["step"] for e in m["evals"]] == list(range(3, 73, 3))


def test_base_snapshot_is_the_initial_model_bit_for_bit(run, tiny_bert, tiny_data):
    from transformers import AutoModelForSequenceClassification
    out, report = run
    torch.manual_seed(42)  # the recipe's seed: the same head initialisation
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    base = load_file(out / "base" / "model.safetensors")
    tuned = load_file(out / "tuned" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(base[name], tensor), name
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    from engine.checkpoint import file_sha256
    assert report["base"]["sha256"] == file_sha256(out / "base" / "model.safetensors")
    assert report["tuned"]["sha256"] == file_sha256(out / "tuned" / "model.safetensors")


def test_pipeline_loads_tuned_and_agrees_with_metrics(run, tiny_data):
    from transformers import pipeline
    out, report = run
    clf = pipeline("text-classification", model=str(out / "tuned"))
    assert clf("great wonderful superb film")[0]["label"] == "LABEL_1"
    assert clf("awful boring terrible film")[0]["label"] == "LABEL_0"
    p = run_cli("launch/evaluate.py", "--model", out / "tuned", "--data", tiny_data, "--max-length", "32",
                "--output", out / "eval.json")
    assert p.returncode == 0, p.stderr
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n"] == 33
    assert ev["accuracy"] == pytest.approx(report["tuned"]["accuracy"])


def test_logs_recipe_and_tensorboard(run):
    out, _ = run
    assert load_recipe(out / "recipe.yaml").train.eval_every == 3
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert any("train/loss" in x for x in lines) and any("eval/accuracy" in x for x in lines)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "eval/accuracy"} <= tags


def test_refuses_to_overwrite_a_finished_run(run):
    out, _ = run
    with pytest.raises(OutputDirError, match="holds a finished run"):
        finetune(load_recipe(out / "recipe.yaml"))


def test_keep_best_takes_the_best_eval(tiny_bert, tiny_data, tmp_path):
    # evaluated and checkpointed every step: tuned/ must hold the weights of the first state that
    # reached the best accuracy (its step's checkpoint), and score what that eval scored
    report = finetune(load_recipe(None, tiny_overrides(tiny_bert, tiny_data, tmp_path) + [
        "train.keep_best=true", "train.eval_every=1", "train.epochs=3", "checkpoint.every=1",
        "checkpoint.keep=1000"]))
    best = max(report["evals"], key=lambda e: e["accuracy"])
    first_best = next(e for e in report["evals"] if e["accuracy"] == best["accuracy"])
    last = report["evals"][-1]
    assert first_best["step"] < last["step"]  # else tuned/ = the last state and nothing is tested
    assert report["tuned"]["step"] == first_best["step"]

    tuned = load_file(tmp_path / "tuned" / "model.safetensors")
    at = {step: {k[len("model/"):]: v for k, v in
                 load_file(tmp_path / "checkpoints" / f"step-{step}" / "shard-0.safetensors").items()
                 if k.startswith("model/")} for step in (first_best["step"], last["step"])}
    assert set(tuned) <= set(at[last["step"]])
    for k in tuned:
        assert torch.equal(tuned[k], at[first_best["step"]][k]), k
    assert any(not torch.equal(tuned[k], at[last["step"]][k]) for k in tuned)

    rescored = evaluate_pretrained(str(tmp_path / "tuned"), DataConfig(source=tiny_data, max_length=32), "test")
    for m in (report["tuned"], rescored):
        assert m["accuracy"] == first_best["accuracy"]
        assert m["loss"] == pytest.approx(first_best["loss"], abs=1e-6)


def test_cli_prints_table_and_bad_data_exits_2(tiny_bert, tiny_data, tmp_path):
    p = run_cli("launch/train.py", "--recipe", "recipes/demo_minilm_imdb.yaml",
                *tiny_overrides(tiny_bert, tiny_data, tmp_path / "ok"), "data.head_tokens=8", "data.eval_split=test",
                "data.holdout_size=0", "data.train_size=null", "train.precision=fp32", "data.where={}",
                "data.label_names=null")
    assert p.returncode == 0, p.stderr
    assert "accuracy" in p.stdout and "tuned" in p.stdout
    bad = run_cli("launch/train.py", "--recipe", "recipes/demo_minilm_imdb.yaml",
                  *tiny_overrides(tiny_bert, tmp_path / "nowhere", tmp_path / "bad"), "data.head_tokens=8")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: data.source does not exist"]
    assert not (tmp_path / "bad" / "metrics.json").exists()


def test_metrics_json_has_the_time_parts_and_the_chosen_precision(run):
    _, report = run
    parts = report["time_parts"]
    assert set(parts) == {"load", "tokenize", "base_eval", "train", "tuned_eval", "save", "other"}
    assert all(v >= 0 for v in parts.values()) and parts["train"] > 0 and parts["tuned_eval"] > 0
    assert sum(parts.values()) == pytest.approx(report["wall_seconds"], abs=0.2)
    assert report["train"]["precision"] == "fp32" and report["train"]["precision_requested"] == "fp32"


def test_auto_precision_runs_what_the_probe_chose_and_says_so(tiny_bert, tiny_data, tmp_path, monkeypatch, capsys):
    from engine import precision
    monkeypatch.setattr(precision, "matmul_seconds", lambda name, threads: 1.0 if name == "fp32" else 5.0)
    report = finetune(load_recipe(None, tiny_overrides(tiny_bert, tiny_data, tmp_path) + [
        "train.precision=auto", "train.epochs=1"]))
    assert capsys.readouterr().out.splitlines()[0].startswith("precision fp32 (auto: bf16 matmul only 0.20x")
    t = report["train"]
    assert (t["precision"], t["precision_requested"], t["precision_ratio"]) == ("fp32", "auto", 0.2)
    assert load_recipe(tmp_path / "recipe.yaml").train.precision == "auto"  # as asked


def test_runs_on_the_same_base_score_it_once(tiny_bert, tiny_data, tmp_path, monkeypatch):
    from engine import finetune as finetune_mod
    calls = []
    real = finetune_mod.evaluate
    monkeypatch.setattr(finetune_mod, "evaluate", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def sweep_run(name, *extra):
        calls.clear()
        report = finetune(load_recipe(None, tiny_overrides(tiny_bert, tiny_data, tmp_path / name) + [
            "train.epochs=1", *extra]))
        return report, len(calls) - len(report["evals"])  # evaluations of the base model

    first, base_evals = sweep_run("a", "train.lr=3e-3")
    assert base_evals == 1 and first["base"]["score_reused"] is False
    second, base_evals = sweep_run("b", "train.lr=1e-3")  # a sweep: another lr, the same base
    assert base_evals == 0 and second["base"]["score_reused"] is True
    assert {k: second["base"][k] for k in ("accuracy", "f1", "loss")} == \
           {k: first["base"][k] for k in ("accuracy", "f1", "loss")}
    # other eval examples, another truncation or another precision is another score
    for name, change in (("c", "data.eval_size=20"), ("d", "data.max_length=16"), ("e", "train.precision=bf16")):
        report, base_evals = sweep_run(name, change)
        assert base_evals == 1 and report["base"]["score_reused"] is False, change


def test_a_sweep_with_a_test_split_scores_base_on_test_once(tiny_bert, tiny_data, tmp_path, monkeypatch):
    # base/ as saved is scored on test at the end of each run: the second run of a sweep reuses it,
    # and `score_reused` speaks of the reported (test) figure, not of the dev score
    from engine import finetune as finetune_mod
    snapshots = []
    real = finetune_mod.score_snapshot

    def counted(run, data, folder, dataset):
        snapshots.append(folder.name)
        return real(run, data, folder, dataset)

    monkeypatch.setattr(finetune_mod, "score_snapshot", counted)

    def sweep_run(name, lr):
        snapshots.clear()
        return finetune(load_recipe(None, tiny_overrides(tiny_bert, tiny_data, tmp_path / name) + [
            "train.epochs=1", f"train.lr={lr}", "data.eval_split=null", "data.holdout_size=32",
            "data.test_split=test"]))

    first = sweep_run("a", 3e-3)
    assert snapshots == ["base", "tuned"] and first["base"]["score_reused"] is False
    second = sweep_run("b", 1e-3)
    assert snapshots == ["tuned"] and second["base"]["score_reused"] is True
    assert second["base"]["accuracy"] == first["base"]["accuracy"] and second["base"]["n"] == first["base"]["n"]

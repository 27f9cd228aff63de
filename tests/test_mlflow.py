"""tracking.mlflow: a run written by the engine, read back with MLflow's own client."""
import hashlib
import importlib.util
import json

import pytest

from conftest import run_cli, tiny_overrides
from engine.errors import RecipeError
from engine.finetune import finetune
from engine.recipe_yaml import load_recipe


def test_a_run_is_read_back_with_mlflows_client(tiny_bert, tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the engine sets it; undone after
    monkeypatch.chdir(tmp_path)  # the default store is ./mlruns
    out = tmp_path / "run"
    report = finetune(load_recipe(None, tiny_overrides(tiny_bert, tiny_data, out) + [
        "train.max_steps=6", "tracking.mlflow=true"]))
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("sentiment-engine")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    # params: the resolved recipe, flattened
    assert run.data.params["train.lr"] == "0.003" and run.data.params["model.name_or_path"] == tiny_bert
    assert run.data.params["train.precision"] == "fp32" and run.data.params["tracking.mlflow"] == "True"
    # per-step metrics: the same series as log.jsonl
    logged = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    expected = [(r["step"], r["train/loss"]) for r in logged if "train/loss" in r]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    history = sorted(history, key=lambda m: m.step)
    assert [m.step for m in history] == [s for s, _ in expected]
    assert [m.value for m in history] == pytest.approx([v for _, v in expected])
    assert len(expected) == 3
    assert [m.value for m in client.get_metric_history(run.info.run_id, "eval/accuracy")] == \
        [e["accuracy"] for e in report["evals"]]
    # final metrics and the tuned/ folder
    assert run.data.metrics["tuned/accuracy"] == report["tuned"]["accuracy"]
    assert run.data.metrics["base/f1"] == report["base"]["f1"]
    names = {a.path for a in client.list_artifacts(run.info.run_id, "tuned")}
    assert "tuned/model.safetensors" in names and "tuned/config.json" in names
    local = client.download_artifacts(run.info.run_id, "tuned/model.safetensors", str(tmp_path / "dl"))
    with open(local, "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == report["tuned"]["sha256"]


def test_tensorboard_stays_the_default(tiny_bert, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    finetune(load_recipe(None, tiny_overrides(tiny_bert, tiny_data, tmp_path / "run") + ["train.max_steps=2"]))
    assert any((tmp_path / "run" / "tb").iterdir())
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "run" / "mlflow_run.json").exists()


def test_without_mlflow_installed_the_recipe_is_refused_naming_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(RecipeError, match=r"'tracking.mlflow' is true but mlflow is not installed: "
                                          r"pip install -e \"\.\[mlflow\]\""):
        load_recipe(None, ["tracking.mlflow=true"])
    load_recipe(None, ["tracking.mlflow=false"])  # only asked for, it is needed
    # as a user meets it: one line, exit 2
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.util as u\nreal = u.find_spec\n"
        "u.find_spec = lambda name, *a: None if name == 'mlflow' else real(name, *a)\n")
    p = run_cli("launch/train.py", "--recipe", "/dev/null", "tracking.mlflow=true", f"output_dir={tmp_path / 'o'}",
                env={"PYTHONPATH": str(tmp_path)})
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and ".[mlflow]" in p.stderr
    assert not (tmp_path / "o").exists()

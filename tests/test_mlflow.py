"""tracking.mlflow: a run written by the engine, read back with MLflow's own client."""
import hashlib
import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli, tiny_overrides
from engine import loop
from engine.errors import RecipeError, StopTraining
from engine.finetune import finetune
from engine.recipe_yaml import load_recipe
from engine.tracking import recipe_params


@pytest.fixture
def store(tmp_path, monkeypatch):
    """The default store, ./mlruns, in tmp_path; MLFLOW_ALLOW_FILE_STORE unset, as a user has it
    (the engine sets it: set and deleted here first, so that is undone after the test)."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.chdir(tmp_path)
    return (tmp_path / "mlruns").as_uri()


def runs_in(uri: str, experiment: str = "sentiment-engine"):
    """(a client, the experiment's runs, oldest first)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, sorted(runs, key=lambda r: r.info.start_time)


def loss_steps(client, run) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))


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


def test_overwrite_starts_a_new_mlflow_run(tiny_bert, tiny_data, tmp_path, store):
    out = tmp_path / "run"
    over = tiny_overrides(tiny_bert, tiny_data, out) + ["train.max_steps=4", "tracking.mlflow=true"]
    finetune(load_recipe(None, over))
    finetune(load_recipe(None, over + ["train.lr=1e-3"]), overwrite=True)
    client, (first, second) = runs_in(store)
    # each run its own params and its own losses, none mixed into the other
    assert (first.data.params["train.lr"], second.data.params["train.lr"]) == ("0.003", "0.001")
    assert first.info.status == second.info.status == "FINISHED"
    assert loss_steps(client, first) == loss_steps(client, second) == [2, 4]
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == second.info.run_id


@pytest.mark.parametrize("error, status", [(RuntimeError("out of memory"), "FAILED"),
                                           (StopTraining("stopped by a signal at step 0"), "KILLED")])
def test_a_run_that_dies_ends_so_and_the_retry_is_a_new_run(tiny_bert, tiny_data, tmp_path, store, monkeypatch,
                                                             error, status):
    out = tmp_path / "run"
    recipe = load_recipe(None, tiny_overrides(tiny_bert, tiny_data, out) + ["train.max_steps=4",
                                                                            "tracking.mlflow=true"])

    def dies(*args, **kwargs):
        raise error

    with monkeypatch.context() as m, pytest.raises(type(error)):
        m.setattr(loop, "train", dies)  # after the tracker opened, before any checkpoint
        finetune(recipe)
    # --resume auto with no checkpoint yet starts over: a new MLflow run, with its params
    finetune(recipe, resume="auto")
    client, (dead, retry) = runs_in(store)
    assert (dead.info.status, retry.info.status) == (status, "FINISHED")
    assert dead.data.params == retry.data.params and set(retry.data.params) == set(recipe_params(recipe))
    assert loss_steps(client, dead) == [] and loss_steps(client, retry) == [2, 4]


@pytest.mark.parametrize("where", ["file_uri", "path"])
def test_an_explicit_file_store_works(tiny_bert, tiny_data, tmp_path, store, where):
    folder = tmp_path / "shared" / "mlruns"
    uri = folder.as_uri() if where == "file_uri" else str(folder)
    finetune(load_recipe(None, tiny_overrides(tiny_bert, tiny_data, tmp_path / "run") + [
        "train.max_steps=2", "tracking.mlflow=true", f"tracking.mlflow_uri={uri}"]))
    client, [run] = runs_in(folder.as_uri())
    assert run.info.status == "FINISHED" and loss_steps(client, run) == [2]


def test_params_log_whatever_the_column_names(tiny_bert, tiny_data, tmp_path, store):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        frame = pd.read_parquet(Path(tiny_data) / f"{split}.parquet")
        frame.rename(columns={"text": "review (full text)"}).to_parquet(data / f"{split}.parquet")
    recipe = load_recipe(None, tiny_overrides(tiny_bert, str(data), tmp_path / "run") + [
        "train.max_steps=2", "tracking.mlflow=true", 'data.rename_columns={"review (full text)": text}'])
    finetune(recipe)
    _, [run] = runs_in(store)
    assert run.info.status == "FINISHED" and set(run.data.params) == set(recipe_params(recipe))
    assert json.loads(run.data.params["data.rename_columns"]) == {"review (full text)": "text"}


def _deleted_experiment(uri, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    client.delete_experiment(client.create_experiment("sentiment-engine"))


@pytest.mark.parametrize("uri, says", [
    ("nosuch://host/x", "unsupported URI 'nosuch://host/x'"),
    ("file:///dev/null/mlruns", "Not a directory"),
    ("http://127.0.0.1:1", "127.0.0.1"),  # a server that does not answer: said at once, not after minutes of retries
    (None, "experiment 'sentiment-engine' is deleted in this store"),
])
def test_a_store_that_cannot_be_used_stops_the_run_before_any_work(tiny_bert, tiny_data, tmp_path, store, monkeypatch,
                                                                   uri, says):
    if uri is None:
        _deleted_experiment(store, monkeypatch)
    out = tmp_path / "run"
    over = tiny_overrides(tiny_bert, tiny_data, out) + ["tracking.mlflow=true"]
    with pytest.raises(RecipeError) as e:
        finetune(load_recipe(None, over + ([f"tracking.mlflow_uri={uri}"] if uri else [])))
    text = str(e.value)
    assert text.startswith(f"tracking.mlflow_uri {uri or '(default: ./mlruns)'}: ") and says in text
    assert "\n" not in text
    assert not out.exists() and not (tmp_path / "cache").exists()  # no base/, nothing tokenized


def test_a_bad_store_is_one_line_and_exit_2(tmp_path):
    pytest.importorskip("mlflow")
    out = tmp_path / "o"
    p = run_cli("launch/train.py", "--recipe", "/dev/null", "tracking.mlflow=true", "tracking.mlflow_uri=nosuch://x",
                f"output_dir={out}")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert p.stderr.startswith("error: tracking.mlflow_uri nosuch://x: the MLflow store cannot be used")
    assert p.stdout == "" and not out.exists()  # checked first: not even the precision line

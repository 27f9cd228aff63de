"""What a run's log says: log.jsonl, TensorBoard and MLflow after a resume hold each step once; the
console's base line says which split it scored."""
import json
import signal

import pytest

from conftest import faults, run_cli, tiny_overrides
from engine.finetune import finetune
from engine.recipe_yaml import load_recipe

COMPARED = ("train/loss", "train/lr", "train/grad_norm", "eval/accuracy", "eval/loss")  # not the clock's


def args(model, data, out, *extra):
    # 192 examples / batch 8: 24 steps, one epoch; checkpoints every 5 steps, evals every 3
    return ["launch/train.py", "--recipe", "/dev/null", *tiny_overrides(model, data, out), "train.epochs=1",
            "checkpoint.every=5", "train.log_every=1", "train.eval_every=3", *extra]


def rows(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def tb_steps(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_a_resumed_run_logs_each_step_once(tiny_bert_dropout, tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # unset for the runs, as a user has it; undone after
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    uri = (tmp_path / "mlruns").as_uri()
    mlflow = ["tracking.mlflow=true", f"tracking.mlflow_uri={uri}"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    p = run_cli(*args(tiny_bert_dropout, tiny_data, reference))
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out, *mlflow), env=faults(kill_at_step=13))
    assert p.returncode == -signal.SIGKILL
    # the premise: the dead attempt logged steps 11 and 12 (an eval at 12) after its checkpoint at 10
    assert [r["step"] for r in rows(out)][-3:] == [11, 12, 12]
    p = run_cli(*args(tiny_bert_dropout, tiny_data, out, *mlflow), "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "mlflow: continuing run" in p.stdout
    # log.jsonl: each step once, the lines and values of the run that was never interrupted
    got, want = rows(out), rows(reference)
    assert [(r["step"], sorted(r)) for r in got] == [(r["step"], sorted(r)) for r in want]
    assert [[r.get(k) for k in COMPARED] for r in got] == [[r.get(k) for k in COMPARED] for r in want]
    # TensorBoard: the dead attempt's steps after the checkpoint are hidden, each step shown once
    assert tb_steps(out, "train/loss") == tb_steps(reference, "train/loss") == list(range(1, 25))
    assert tb_steps(out, "eval/accuracy") == list(range(3, 25, 3))
    # MLflow: the same run goes on, and holds each step once too
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this reader
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("sentiment-engine").experiment_id])
    assert run.info.status == "FINISHED"
    for key, steps in (("train/loss", range(1, 25)), ("eval/accuracy", range(3, 25, 3))):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(steps)


def test_with_a_test_split_the_base_line_says_it_is_on_dev(tiny_bert, tiny_data, tmp_path, capsys):
    over = tiny_overrides(tiny_bert, tiny_data, tmp_path) + [
        "data.eval_split=null", "data.holdout_size=32", "data.test_split=test", "train.epochs=1"]
    report = finetune(load_recipe(None, over))
    lines = capsys.readouterr().out.splitlines()
    dev, test = report["dev"]["base"], report["base"]
    assert [x for x in lines if x.startswith("base")] == [
        f"base on dev (n 32): accuracy {dev['accuracy']:.4f}  f1 {dev['f1']:.4f}"]
    assert [x for x in lines if x.startswith("test:")][0].startswith(
        f"test: base accuracy {test['accuracy']:.4f}, tuned {report['tuned']['accuracy']:.4f} (n 33)")

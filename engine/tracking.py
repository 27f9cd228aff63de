"""What a run reports while it trains: TensorBoard events, JSON lines, a console progress bar, and
MLflow when the recipe asks for it (tracking.mlflow).

Only the main rank writes; the others get a tracker that does nothing, so callers never branch.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm


class MlflowRun:
    """One MLflow run through MlflowClient (no global active run the user's own code might hold).

    The run id is kept in output_dir/mlflow_run.json, so a resumed run goes on logging into the
    same MLflow run."""

    def __init__(self, out: Path, cfg, params: dict):
        if cfg.mlflow_uri is None:
            # MLflow 3 refuses its file store unless told: it is the one that needs no database or
            # server, and the recipe's default is a local, offline store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = cfg.mlflow_uri or Path("mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        known = out / "mlflow_run.json"
        if known.exists():
            self.run_id = json.loads(known.read_text(encoding="utf-8"))["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(cfg.mlflow_experiment)
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.mlflow_experiment)
        self.run_id = self.client.create_run(exp_id, run_name=out.resolve().name).info.run_id
        known.write_text(json.dumps({"tracking_uri": self.uri, "run_id": self.run_id}), encoding="utf-8")
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def metrics(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def artifacts(self, folder: Path, name: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path=name)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class Tracker:
    def __init__(self, out_dir: str | Path, enabled: bool, total_steps: int, mlflow=None, params: dict | None = None):
        """`mlflow`: the recipe's tracking section when it asks for MLflow, with `params` (the
        resolved recipe, flattened) to log there."""
        self.enabled = enabled
        self.tb = self.jsonl = self.bar = self.mlflow = None
        self.done, self.total = 0, total_steps
        if not enabled:
            return
        out = Path(out_dir)
        self.out = out
        if mlflow is not None and mlflow.mlflow:
            self.mlflow = MlflowRun(out, mlflow, params or {})
        self.tb = SummaryWriter(str(out / "tb"))
        self.jsonl = open(out / "log.jsonl", "a", encoding="utf-8")
        self.bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True,
                        disable=None, file=sys.stderr)

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        flat = {f"{prefix}{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        for k, v in flat.items():
            self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **flat}) + "\n")
        self.jsonl.flush()
        if self.mlflow:
            self.mlflow.metrics(flat, step)

    def progress(self, steps: int, **shown) -> None:
        if not self.enabled:
            return
        self.bar.update(steps)
        self.done += steps
        text = {k: f"{v:.4g}" for k, v in shown.items()}
        if self.bar.disable:  # not a terminal (CI, a log file): a plain line instead of a bar
            print(f"step {self.done}/{self.total} " + " ".join(f"{k} {v}" for k, v in text.items()),
                  file=sys.stderr, flush=True)
        else:
            self.bar.set_postfix(text, refresh=False)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        if self.enabled:
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            self.tb.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def final(self, metrics: dict, step: int) -> None:
        """The run's reported figures, and tuned/ as an MLflow artifact (TensorBoard has them as hparams)."""
        if self.enabled and self.mlflow:
            self.mlflow.metrics(metrics, step)
            self.mlflow.artifacts(self.out / "tuned", "tuned")

    def close(self, status: str = "FINISHED") -> None:
        """`status`: how the MLflow run ends (FINISHED, or KILLED for a run stopped to be resumed)."""
        if self.enabled:
            self.bar.close()
            self.tb.close()
            self.jsonl.close()
            if self.mlflow:
                self.mlflow.end(status)

"""What a run reports while it trains: TensorBoard events, JSON lines, a console progress bar, and
MLflow when the recipe asks for it (tracking.mlflow).

Only the main rank writes; the others get a tracker that does nothing, so callers never branch.
A run resumed from a checkpoint continues its log from that checkpoint's step: what the dead attempt
logged after it is trained again, and each step stays in log.jsonl, TensorBoard and MLflow once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from engine.errors import RecipeError, StopTraining
from engine.paths import write_json_atomic

MLFLOW_RECORD = "mlflow_run.json"  # in output_dir: the MLflow run a resume logs on into
_OPEN: set = set()  # trackers not closed yet: those ends_open_runs closes when a run fails


def mlflow_store(cfg) -> tuple[object, str]:
    """(an MlflowClient, its tracking URI) for the recipe's tracking section."""
    uri = cfg.mlflow_uri or Path("mlruns").resolve().as_uri()
    if urllib.parse.urlparse(uri).scheme in ("", "file"):
        # MLflow 3 refuses its file store unless told. It is the store that needs no server, no
        # database and no extra package (the mlflow-skinny client has no SQLAlchemy for
        # sqlite:///), which offline clusters name on a shared disk: the default and explicit alike
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri), uri


def check_mlflow(cfg, dist) -> None:
    """Try tracking.mlflow's store before any work (rank 0 asks, every rank gets its answer): a URI
    that cannot be used stops the run in one line here, not after tokenizing and scoring the base."""
    if not cfg.mlflow:
        return
    problem = dist.broadcast_object(_store_problem(cfg) if dist.is_main else None)
    if problem:
        raise RecipeError(f"tracking.mlflow_uri {cfg.mlflow_uri or '(default: ./mlruns)'}: {problem}")


def _store_problem(cfg) -> str | None:
    try:
        with _quick_http():
            client, _ = mlflow_store(cfg)
            experiment = client.get_experiment_by_name(cfg.mlflow_experiment)
    except Exception as e:  # whatever the store answers is the reason: said in one line
        return "the MLflow store cannot be used: " + (" ".join(str(e).split())[:600] or type(e).__name__)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        return (f"experiment {cfg.mlflow_experiment!r} is deleted in this store; restore it, or pick another "
                f"tracking.mlflow_experiment")
    return None


@contextlib.contextmanager
def _quick_http():
    """MLflow retries a server it cannot reach for minutes (7 times, growing back-off): the check at
    start tries twice, so a wrong address is said at once (unless the user set these variables)."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    ours = [k for k in quick if k not in os.environ]
    os.environ.update({k: quick[k] for k in ours})
    try:
        yield
    finally:
        for k in ours:
            os.environ.pop(k, None)


def recipe_params(recipe, prefix: str = "") -> dict[str, str]:
    """The recipe as MLflow params, one per key, named by its dataclass path (`train.lr`): every name
    is one MLflow accepts. A key whose value is a mapping or a list is one param holding its JSON:
    its entries are the user's (data.rename_columns names columns, `(` and all), not param names."""
    out = {}
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        if dataclasses.is_dataclass(value):
            out.update(recipe_params(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = json.dumps(value, ensure_ascii=False) if isinstance(
                value, (dict, list, tuple)) else str(value)
    return out


class MlflowRun:
    """One MLflow run through MlflowClient (no global active run the user's own code might hold).

    output_dir/mlflow_run.json names it. Only a run resumed from a checkpoint logs on into it; any
    other start (--overwrite, --resume auto with no checkpoint yet) is a new run of output_dir and
    gets a new MLflow run, its own params and metrics; the one it replaces, if left RUNNING by a
    process that died, ends KILLED."""

    def __init__(self, out: Path, cfg, params: dict, resumed_at: int | None):
        self.client, self.uri = mlflow_store(cfg)
        self.done: dict[str, int] = {}  # per metric: the last step the run holds (a resumed one)
        record = out / MLFLOW_RECORD
        earlier = self._recorded(record)
        self.continued = resumed_at is not None and earlier is not None
        if self.continued:
            self.run_id = earlier
            self.client.update_run(self.run_id, status="RUNNING")
            self.done = self._logged_steps()
            return
        if earlier:
            self._end_if_running(earlier)
        self.run_id = self._create(cfg.mlflow_experiment, out.resolve().name, params)
        write_json_atomic(record, {"tracking_uri": self.uri, "run_id": self.run_id})

    def _recorded(self, record: Path) -> str | None:
        """The run output_dir/mlflow_run.json names, if it is in this store."""
        try:
            known = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return known.get("run_id") if isinstance(known, dict) and known.get("tracking_uri") == self.uri else None

    def _end_if_running(self, run_id: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, status="KILLED")
        except MlflowException:  # deleted from the store since: nothing to end
            pass

    def _create(self, experiment_name: str, run_name: str, params: dict) -> str:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        experiment = self.client.get_experiment_by_name(experiment_name)
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        items = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]  # the whole: recipe.yaml
        try:
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(run_id, params=items[i:i + 100])
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        return run_id

    def _logged_steps(self) -> dict[str, int]:
        """Per metric, the last step the run holds. A resume trains again the steps between its
        checkpoint and the crash, which the dead attempt logged; MLflow cannot delete a point, so
        those steps keep the first attempt's values and are not logged a second time."""
        keys = self.client.get_run(self.run_id).data.metrics
        return {k: max(m.step for m in self.client.get_metric_history(self.run_id, k)) for k in keys}

    def metrics(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, step) for k, v in values.items() if step > self.done.get(k, -1)]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)

    def artifacts(self, folder: Path, name: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path=name)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def keep_through(log: Path, step: int) -> None:
    """log.jsonl as it stood at the checkpoint resumed from: the lines up to `step`, rewritten
    atomically (a kill now leaves the old file or the new one). The later lines are the dead
    attempt's, for steps this run is about to train and log again."""
    if not log.exists():
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{log.name}.", dir=log.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as kept, open(log, encoding="utf-8") as lines:
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:  # the line a kill cut short
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.write(line if line.endswith("\n") else line + "\n")
        kept.flush()
        os.fsync(kept.fileno())
    os.replace(tmp, log)


def ends_open_runs(run):
    """For a run's entry point (finetune): a tracker it opened and left open when an exception
    leaves it is closed, so its MLflow run ends FAILED, or KILLED on a stop (a signal, a non-finite
    loss, Ctrl-C: continued with --resume), never RUNNING; the exception goes on."""

    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        before = set(_OPEN)
        try:
            return run(*args, **kwargs)
        except BaseException as e:
            status = "KILLED" if isinstance(e, (StopTraining, KeyboardInterrupt)) else "FAILED"
            for tracker in _OPEN - before:
                with contextlib.suppress(Exception):  # the run's own error is the one to report
                    tracker.close(status)
            raise

    return wrapper


class Tracker:
    def __init__(self, out_dir: str | Path, enabled: bool, total_steps: int, mlflow=None, params: dict | None = None,
                 resumed_at: int | None = None):
        """`mlflow`: the recipe's tracking section when it asks for MLflow, with `params` (the
        recipe, as recipe_params gives it) to log there. `resumed_at`: the step of the checkpoint
        a resumed run starts from (None: a new run); the log continues from it."""
        self.enabled, self.closed = enabled, False
        self.tb = self.jsonl = self.bar = self.mlflow = None
        self.done, self.total = 0, total_steps
        if not enabled:
            return
        out = Path(out_dir)
        self.out = out
        if mlflow is not None and mlflow.mlflow:
            self.mlflow = MlflowRun(out, mlflow, params or {}, resumed_at)
        _OPEN.add(self)
        if resumed_at is not None:
            keep_through(out / "log.jsonl", resumed_at)
        # purge_step: TensorBoard hides the dead attempt's events after the checkpoint's step
        self.tb = SummaryWriter(str(out / "tb"), purge_step=None if resumed_at is None else resumed_at + 1)
        self.jsonl = open(out / "log.jsonl", "a", encoding="utf-8")
        self.bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True,
                        disable=None, file=sys.stderr)
        if self.mlflow:
            self.message(f"mlflow: {'continuing' if self.mlflow.continued else 'new'} run {self.mlflow.run_id} "
                         f"in {self.mlflow.uri}")

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        flat = {f"{prefix}{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        for k, v in flat.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()  # on disk as the step is: a resume's checkpoint must not be ahead of the events
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
        """`status`: how the MLflow run ends (FINISHED; KILLED for a run stopped to be resumed;
        FAILED). Once: a later call does nothing."""
        if not self.enabled or self.closed:
            return
        self.closed = True
        _OPEN.discard(self)
        for part in (self.bar, self.tb, self.jsonl):
            if part is not None:
                part.close()
        if self.mlflow:
            self.mlflow.end(status)

"""output_dir and resuming: one run per folder, which checkpoint a run continues from (rank 0
chooses), and what that checkpoint must share with the run resuming it: every recipe key but those
engine/config.py lets change (`@on_resume`), and the facts the model and data give."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import secrets
import shutil
import socket
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from engine import checkpoint, optim
from engine.config import FIXED, Recipe
from engine.errors import CheckpointError, OutputDirError, StopTraining

STAGING = ".unfinished"  # tuned/ and adapter/ until the run is scored (finetune.export_tuned)
# what a run leaves that a new run must not append to or be mistaken for (base/ and recipe.yaml
# are rewritten whole by the next run)
RUN_OUTPUTS = ("metrics.json", "tuned", "adapter", STAGING, checkpoint.CHECKPOINTS, "log.jsonl", "tb")
LENGTH_KEYS = ("train.epochs", "train.max_steps")  # what extends a run (its facts' "steps" follow)


@dataclass
class Resumed:
    """The checkpoint a run continues from, and what the run changes on the way."""
    folder: Path
    state: dict  # its state.json
    finished: bool  # output_dir held a finished run: this resume extends it
    changes: dict = field(default_factory=dict)  # {key: (checkpoint's value, this run's)}: keys that may change
    steps: tuple[int, int] | None = None  # (the checkpoint's run length, this run's) when they differ

    @property
    def step(self) -> int:
        return self.state["loop"]["step"]


def prepare_output_dir(out: Path, overwrite: bool, resume: str | None, dist) -> tuple[Path | None, bool]:
    """Refuse to mix runs in one folder. Returns (the checkpoint to resume from, or None; whether
    output_dir holds a finished run, which only a resume that trains longer may continue). Rank 0
    looks at the folder and every rank takes its view: all resume from the same checkpoint."""
    finished, existing, leftovers, explicit_ok = dist.broadcast_object(
        _look(out, resume) if dist.is_main else None)
    # --resume auto with nothing to resume (an elastic restart before the first checkpoint): start clean
    if overwrite or (resume == "auto" and not existing and not finished and leftovers):
        clear_run(out, dist)
        finished, existing, leftovers = False, [], []
    resume_from = None
    if resume == "auto":
        resume_from = Path(existing[-1]) if existing else None
    elif resume:
        resume_from = Path(resume)
        if not explicit_ok:
            raise CheckpointError(f"{resume_from}: not a checkpoint (no state.json)")
    if finished and resume_from is None:
        raise OutputDirError(f"{out}: holds a finished run (metrics.json); pick another output_dir "
                             f"or pass --overwrite")
    if not resume and existing:
        raise OutputDirError(f"{out}: holds checkpoints of an unfinished run; continue it with "
                             f"--resume auto, or start over with --overwrite")
    if not resume and leftovers:
        raise OutputDirError(f"{out}: holds an unfinished run ({leftovers[0]}) and no checkpoint to resume; "
                             f"start over with --overwrite")
    if dist.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # the recipe's check cannot foresee every refusal (a read-only mount)
            raise OutputDirError(f"{out}: output_dir cannot be created ({e.strerror or e})") from None
    return resume_from, finished


def _look(out: Path, resume: str | None) -> tuple:
    """(finished, checkpoints oldest first, a run's leftovers, whether --resume PATH is a checkpoint)."""
    existing = [str(p) for p in checkpoint.checkpoint_dirs(out)]
    explicit_ok = resume not in (None, "auto") and (Path(resume) / "state.json").exists()
    return (out / "metrics.json").exists(), existing, [n for n in RUN_OUTPUTS if (out / n).exists()], explicit_ok


def clear_run(out: Path, dist) -> None:
    """Delete what an earlier run left (rank 0, once every rank has looked at the folder)."""
    dist.barrier()
    if dist.is_main:  # nothing of the old run may be mistaken for the new one's
        for name in RUN_OUTPUTS:
            path = out / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    dist.barrier()


def check_shared(out: Path, dist, wait_s: float = 10.0) -> None:
    """Every rank must see the output_dir rank 0 writes (one filesystem shared by every node):
    rank 0 writes a token with a fresh nonce, every rank looks for it. `wait_s`: how long a rank
    waits for it (a network filesystem's caches may show a new file a moment late)."""
    if dist.world == 1:
        return
    nonce = dist.broadcast_object(secrets.token_hex(16) if dist.is_main else None)
    token = out / f".shared-check-{nonce}"
    if dist.is_main:
        token.write_text(nonce, encoding="utf-8")
    dist.barrier()
    deadline = time.monotonic() + wait_s
    while not (seen := _reads(token, nonce)) and time.monotonic() < deadline:
        time.sleep(0.5)
    views = dist.all_gather_object((seen, socket.gethostname(), dist.rank))
    if dist.is_main:
        token.unlink(missing_ok=True)
    blind = [(host, rank) for ok, host, rank in views if not ok]
    if blind:
        host, rank = blind[0]
        raise OutputDirError(f"{out}: rank {rank} on node {host} does not see the files rank 0 writes there "
                             f"({len(blind)} rank(s) do not); every node needs output_dir on one shared filesystem")


def _reads(token: Path, nonce: str) -> bool:
    try:
        return token.read_text(encoding="utf-8") == nonce
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# What a checkpoint must share with the run resuming it


def rules(schema: type = Recipe, prefix: str = "") -> dict[str, str | None]:
    """{dotted key: FIXED, or why it may change on resume; None where its section gives no decision}."""
    table = schema.__dict__.get("RESUME", {})  # the section's own, not a parent class's
    hints = typing.get_type_hints(schema)
    out = {}
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(rules(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = table.get(f.name)
    return out


def recipe_values(recipe) -> dict:
    """{dotted key: value} of every key, as JSON keeps them (what a checkpoint stores and is compared on)."""
    out = {}
    for key in rules(type(recipe)):
        value = recipe
        for part in key.split("."):
            value = getattr(value, part)
        out[key] = value
    return json.loads(json.dumps(out, default=str))


def check_recipe(folder: Path, saved: dict, now: dict) -> dict:
    """Refuse a key that may not change (default-deny: a key without a decision may not); return
    {key: (checkpoint's value, this run's)} of those that may and did. A key the checkpoint predates
    counts as its default (a key is added with the default that keeps the old behaviour)."""
    decided, defaults = rules(), recipe_values(Recipe())
    changes = {}
    for key, value in now.items():
        then = saved.get(key, defaults.get(key))
        if then == value:
            continue
        if decided.get(key) in (FIXED, None):
            raise CheckpointError(f"{folder}: {key} was {then!r} when this checkpoint was written, now {value!r}; "
                                  f"it may not change on resume (set it back, or start over with --overwrite)")
        changes[key] = (then, value)
    return changes


def run_facts(model, labels: list[str], n_train: int, n_eval: int, total_steps: int, dist) -> dict:
    """What the model, data and processes give, beside the recipe; "steps" (the run's length) may
    differ where train.epochs / train.max_steps did."""
    shapes = hashlib.sha256("".join(f"{k}{tuple(v.shape)}" for k, v in model.state_dict().items()).encode())
    return json.loads(json.dumps({
        "weight shapes (sha256)": shapes.hexdigest(), "processes": dist.world, "strategy": dist.strategy,
        "classes": list(labels), "train examples": n_train, "eval examples": n_eval, "steps": total_steps}))


def fingerprint(recipe: Recipe, resumed: Resumed | None, model, labels: list[str], n_train: int, n_eval: int,
                total_steps: int, dist) -> dict:
    """What a checkpoint of this run carries to be resumed: the recipe's values and the run's facts.
    The checkpoint resumed must share the facts (its recipe was checked when it was opened)."""
    facts = run_facts(model, labels, n_train, n_eval, total_steps, dist)
    if resumed:
        check_facts(resumed, facts)
    return {"recipe": recipe_values(recipe), "facts": facts}


def open_checkpoint(folder: Path, out: Path, finished: bool, recipe: Recipe, say) -> Resumed:
    """The checkpoint to continue from, read and checked against this run's recipe before any work:
    a key that may not change is refused in one line, the changes of the others are said."""
    state = checkpoint.read_state(folder)
    missing = [k for k in ("fingerprint", "loop", "base_metrics")
               if not isinstance(state, dict) or not isinstance(state.get(k), dict)]
    if missing:
        raise CheckpointError(f"{folder}/state.json: not a training checkpoint of this engine "
                              f"(no {', '.join(missing)})")
    saved = state["fingerprint"]
    if not isinstance(saved.get("recipe"), dict) or not isinstance(saved.get("facts"), dict):
        raise CheckpointError(f"{folder}/state.json: written by an older version of this engine (no recipe "
                              f"in its fingerprint); finish it with that version, or start over with --overwrite")
    if folder.resolve().parent != (out / checkpoint.CHECKPOINTS).resolve():
        raise CheckpointError(f"{folder}: not a checkpoint of output_dir {out}; a resume continues the run in "
                              f"its own folder (its base/, log and checkpoints): set output_dir to that run's")
    changes = check_recipe(folder, saved["recipe"], recipe_values(recipe))
    if finished and not any(k in changes for k in LENGTH_KEYS):
        raise OutputDirError(f"{out}: holds a finished run (metrics.json); --resume continues a finished run "
                             f"only to train it longer (raise train.epochs or train.max_steps); else pick "
                             f"another output_dir or pass --overwrite")
    for key, (then, now) in changes.items():
        say(f"resume: {key} {then!r} -> {now!r}")
    return Resumed(folder, state, finished, changes)


def check_facts(resumed: Resumed, facts: dict) -> None:
    """Refuse a checkpoint whose model, data or processes differ from this run's; a new run length
    must leave steps to train (it is kept in `resumed.steps`)."""
    saved, folder, at = resumed.state["fingerprint"]["facts"], resumed.folder, resumed.step
    for key, value in facts.items():
        if key != "steps" and saved.get(key) != value:
            raise CheckpointError(f"{folder}: {key} was {saved.get(key)!r} when this checkpoint was written, "
                                  f"now {value!r}; a resume must see the same model, data and processes "
                                  f"(start over with --overwrite)")
    then, now = saved.get("steps"), facts["steps"]
    if then != now:
        if now <= at:
            raise CheckpointError(f"{folder}: this recipe's run takes {now} steps, and the checkpoint is at step "
                                  f"{at}; a resume must leave steps to train (raise train.epochs or train.max_steps)")
        if resumed.state["loop"].get("stopped_early"):
            raise CheckpointError(f"{folder}: its run stopped early (train.early_stopping_patience ran out at "
                                  f"step {at}); training longer would train no step")
        resumed.steps = (then, now)
    elif resumed.finished:
        raise OutputDirError(f"{folder.parent.parent}: holds a finished run of {now} steps, and this recipe's run "
                             f"takes as many; raise train.epochs or train.max_steps to train it longer")


def restore(resumed: Resumed, out: Path, model, optimizer, scheduler, precision, dist, extra: dict, say) -> dict:
    """Load the checkpoint into the model, optimizer and schedule (rebuilt over the new length, if it
    changed: the log says how the lr moves); put its `extra` {name: file} back and drop the
    checkpoints of an abandoned later attempt (rank 0). Returns the loop's saved position."""
    checkpoint.load_training_state(resumed.folder, model, optimizer, scheduler, precision, dist)
    loop = resumed.state["loop"]
    say(f"resumed from {resumed.folder} (step {loop['step']}, epoch {loop['epoch']})")
    if resumed.steps:
        then, now = resumed.steps
        before = optimizer.param_groups[0]["lr"]
        after = optim.follow_schedule(scheduler)[0]
        say(f"resume: the run now takes {now} steps (was {then}); the lr schedule is rebuilt over {now} steps: "
            f"the lr of step {loop['step'] + 1} is {after:.4g} (the {then}-step schedule's was {before:.4g})")
    if dist.is_main:
        for name, dest in extra.items():
            checkpoint.restore_extra(resumed.folder, name, dest)
        dropped = checkpoint.drop_newer(out, loop["step"])
        if dropped:
            say(f"removed the checkpoints of the abandoned attempt after step {loop['step']}: "
                + ", ".join(p.name for p in dropped))
    dist.barrier()
    return loop


def stopped(e: StopTraining, out: Path, tracker) -> StopTraining:
    """A stop (a signal, a non-finite loss) as the one line that says how to continue the run; the
    tracker ends the run as KILLED."""
    tracker.close("KILLED")
    latest = checkpoint.checkpoint_dirs(out)
    where = f"the last checkpoint is {latest[-1]}" if latest else "no checkpoint was written"
    return StopTraining(f"{e}; {where}; continue with: --resume auto")


@contextlib.contextmanager
def resumable(out: Path, tracker):
    """Around the steps after training: a stop ends the run in one line (`stopped`)."""
    try:
        yield
    except StopTraining as e:
        raise stopped(e, out, tracker) from None

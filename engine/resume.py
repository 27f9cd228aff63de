"""output_dir and resuming: one run per folder, which checkpoint a run continues from, and the
fingerprint that checkpoint must match (what may not change between it and the run resuming)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from engine import checkpoint
from engine.config import Recipe
from engine.errors import OutputDirError


def prepare_output_dir(out: Path, overwrite: bool, resume: str | None, dist) -> Path | None:
    """Refuse to mix runs in one folder; return the checkpoint to resume from, if any."""
    finished = (out / "metrics.json").exists()
    existing = checkpoint.checkpoint_dirs(out)
    if overwrite:
        dist.barrier()
        if dist.is_main:  # nothing of the old run may be mistaken for the new one's
            for name in ("metrics.json", "tuned", "adapter", checkpoint.CHECKPOINTS, "log.jsonl", "tb"):
                path = out / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        dist.barrier()
        finished, existing = False, []
    if finished:
        raise OutputDirError(f"{out}: holds a finished run (metrics.json); pick another output_dir "
                             f"or pass --overwrite")
    resume_from = None
    if resume == "auto":
        resume_from = existing[-1] if existing else None
    elif resume:
        resume_from = Path(resume)
        if not (resume_from / "state.json").exists():
            raise checkpoint.CheckpointError(f"{resume_from}: not a checkpoint (no state.json)")
    elif existing:
        raise OutputDirError(f"{out}: holds checkpoints of an unfinished run; continue it with "
                             f"--resume auto, or start over with --overwrite")
    if dist.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # the recipe's check cannot foresee every refusal (a read-only mount)
            raise OutputDirError(f"{out}: output_dir cannot be created ({e.strerror or e})") from None
    return resume_from


def run_fingerprint(recipe: Recipe, model, n_train: int, n_eval: int, dist) -> dict:
    """What must not change between a checkpoint and the run that resumes from it."""
    shapes = hashlib.sha256("".join(f"{k}{tuple(v.shape)}" for k, v in model.state_dict().items()).encode())
    return {
        "model": recipe.model.name_or_path, "weights_shape_sha256": shapes.hexdigest(),
        "world_size": dist.world, "strategy": dist.strategy, "replicas": recipe.distributed.replicas,
        "batch_size": recipe.train.batch_size, "grad_accum": recipe.train.grad_accum,
        "max_length": recipe.data.max_length, "train_n": n_train, "eval_n": n_eval,
        "seed": recipe.seed, "peft": recipe.peft.method,
        # the same counts can hide other token ids or another split, and LambdaLR's saved state
        # holds no schedule: these must match too
        "truncation": recipe.data.truncation, "head_tokens": recipe.data.head_tokens,
        "holdout_size": recipe.data.holdout_size, "test_split": recipe.data.test_split,
        "test_size": recipe.data.test_size, "schedule": recipe.train.schedule,
        "min_lr_ratio": recipe.train.min_lr_ratio, "warmup_ratio": recipe.train.warmup_ratio,
    }


def check_fingerprint(folder: Path, saved: dict, now: dict) -> None:
    for key, value in now.items():
        if saved.get(key) != value:
            raise checkpoint.CheckpointError(
                f"{folder}: written by a different run ({key} was {saved.get(key)!r}, now {value!r})")


def read_checkpoint(resume_from: Path | None, fingerprint: dict) -> dict | None:
    """The state.json of the checkpoint resumed from (None: a fresh run), checked to come from this run."""
    saved = checkpoint.read_state(resume_from) if resume_from else None
    if saved is not None:
        missing = [k for k in ("fingerprint", "loop", "base_metrics")
                   if not isinstance(saved, dict) or not isinstance(saved.get(k), dict)]
        if missing:
            raise checkpoint.CheckpointError(f"{resume_from}/state.json: not a training checkpoint of this "
                                             f"engine (no {', '.join(missing)})")
        check_fingerprint(resume_from, saved["fingerprint"], fingerprint)
    return saved

"""output_dir and resuming: one run per folder, which checkpoint a run continues from, and the
fingerprint that checkpoint must match (what may not change between it and the run resuming)."""
from __future__ import annotations

import hashlib
import secrets
import shutil
import socket
import time
from pathlib import Path

from engine import checkpoint
from engine.config import Recipe
from engine.errors import OutputDirError

STAGING = ".unfinished"  # tuned/ and adapter/ until the run is scored (finetune.export_tuned)
# what a run leaves that a new run must not append to or be mistaken for (base/ and recipe.yaml
# are rewritten whole by the next run)
RUN_OUTPUTS = ("metrics.json", "tuned", "adapter", STAGING, checkpoint.CHECKPOINTS, "log.jsonl", "tb")


def prepare_output_dir(out: Path, overwrite: bool, resume: str | None, dist) -> Path | None:
    """Refuse to mix runs in one folder; return the checkpoint to resume from, if any."""
    finished = (out / "metrics.json").exists()
    existing = checkpoint.checkpoint_dirs(out)
    leftovers = [name for name in RUN_OUTPUTS if (out / name).exists()]
    # --resume auto with nothing to resume (an elastic restart before the first checkpoint): start clean
    if overwrite or (resume == "auto" and not existing and not finished and leftovers):
        clear_run(out, dist)
        finished, existing, leftovers = False, [], []
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
    elif leftovers:
        raise OutputDirError(f"{out}: holds an unfinished run ({leftovers[0]}) and no checkpoint to resume; "
                             f"start over with --overwrite")
    if dist.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # the recipe's check cannot foresee every refusal (a read-only mount)
            raise OutputDirError(f"{out}: output_dir cannot be created ({e.strerror or e})") from None
    return resume_from


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

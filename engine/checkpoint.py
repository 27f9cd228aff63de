"""Snapshots on disk: `base/` and `tuned/` in the save_pretrained layout, written atomically.

A snapshot folder either holds a complete model or does not exist: it is written under a temporary
name and renamed into place, so a crash never leaves a half-written folder that looks finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from engine import run_settings
from engine.errors import CheckpointError

WEIGHTS = "model.safetensors"


def atomic_dir(final: Path):
    """A temporary sibling folder; `commit_dir(tmp, final)` moves it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def commit_dir(tmp: Path, final: Path) -> None:
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def save_snapshot(model, tokenizer, folder: str | Path, state_dict=None, recipe=None) -> str:
    """Write model + tokenizer to `folder` (save_pretrained layout); return the weights' sha256.
    `recipe` (as it runs): also how the run reads and scores text (engine/run_settings.py)."""
    final = Path(folder)
    tmp = atomic_dir(final)
    try:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if recipe is not None:
            names = [model.config.id2label[i] for i in range(model.config.num_labels)]
            run_settings.write(tmp, run_settings.settings_of(recipe, names))
        commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return file_sha256(final / WEIGHTS)


def publish(staging: Path, out: Path, names=("adapter", "tuned")) -> None:
    """Move the finished snapshots from `staging` into `out` (rank 0, once the run is scored; its
    metrics.json is written after them, so a snapshot beside no metrics.json is of an unfinished run)."""
    for name in names:
        if (staging / name).is_dir():
            if (out / name).exists():
                shutil.rmtree(out / name)
            os.replace(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Training state: everything needed to continue a run exactly where it stopped.
#
# checkpoints/step-N/
#   state.json            loop position, evals, scheduler, scaler, optimizer hyper-parameters,
#                         the run's fingerprint: every recipe key and the run's facts (rank 0;
#                         engine/resume.py checks a resume against it)
#   shard-R.safetensors   model weights + optimizer moments: rank R's shard under FSDP, the
#                         whole of them from rank 0 otherwise
#   rng-R.json            every RNG of rank R
#   best.safetensors      with keep_best: the best weights so far (those of the state's `best`)
# Nothing is pickled: tensors are safetensors, the rest JSON, so loading runs no stored code.

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step-"
BEST = "best.safetensors"  # with keep_best: the best weights so far, and a copy in each checkpoint


def best_weights_file(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS / BEST


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Committed checkpoints, oldest first (temporary folders of interrupted saves are skipped)."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
             and p.name[len(STEP_PREFIX):].isdigit() and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def _flatten(model_sd: dict, optim_sd: dict, dist):
    """Tensors keyed for safetensors (this rank's part of sharded ones), and the optimizer's
    non-tensor parts for JSON."""
    tensors = {f"model/{k}": dist.local_tensor(v) for k, v in model_sd.items()}
    for fqn, state in optim_sd["state"].items():
        for name, v in state.items():
            tensors[f"optim/{fqn}/{name}"] = dist.local_tensor(v)
    return tensors, optim_sd["param_groups"]


def save_training_state(out_dir: str | Path, step: int, model, optimizer, scheduler, precision, dist,
                        state: dict, keep: int, extra: dict | None = None) -> Path:
    """Write checkpoints/step-N atomically on every rank's behalf; keep the newest `keep`.
    `extra` {name: file}: files (rank 0's, where they exist) that belong with this state."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = Path(out_dir) / CHECKPOINTS / f"{STEP_PREFIX}{step}"
    tmp = Path(dist.broadcast_object(str(atomic_dir(final)) if dist.is_main else None))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    tensors, groups = _flatten(model_sd, optim_sd, dist)
    sharded = dist.shards_state
    if sharded or dist.is_main:
        # contiguous copies: safetensors refuses views and tensors that share memory (tied weights)
        save_file({k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()},
                  tmp / f"shard-{dist.rank if sharded else 0}.safetensors")
    _write_json(tmp / f"rng-{dist.rank}.json", rng_state())
    if dist.is_main:
        for name, path in (extra or {}).items():
            if Path(path).exists():
                _link_or_copy(Path(path), tmp / name)
        _write_json(tmp / "state.json", {
            **state, "world_size": dist.world, "sharded": sharded,
            "scheduler": scheduler.state_dict(),
            "scaler": precision.scaler.state_dict() if precision.scaler else None,
            "param_groups": groups,
        })
    dist.barrier()  # every rank's files are in place before the folder becomes visible
    if dist.is_main:
        commit_dir(tmp, final)
        for old in checkpoint_dirs(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in final.parent.glob(f".{STEP_PREFIX}*.tmp-*"):  # left by saves that were killed
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the filesystem has them (the source is only ever replaced, never written
    in place, so the link keeps its content), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def restore_extra(folder: Path, name: str, dest: Path) -> None:
    """Put a checkpoint's `name` back at `dest` (rank 0, on resume); none in the checkpoint: none at
    `dest` either, so nothing of an abandoned attempt outlives the state resumed."""
    src = Path(folder) / name
    if not src.exists():
        Path(dest).unlink(missing_ok=True)
        return
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    _link_or_copy(src, tmp)
    os.replace(tmp, dest)


def drop_newer(out_dir: str | Path, step: int) -> list[Path]:
    """Remove the checkpoints after `step` (rank 0, on resume from it): they belong to an attempt
    this run abandons, and pruning by step number would keep them over this run's own, for a later
    `--resume auto` to pick."""
    newer = [p for p in checkpoint_dirs(out_dir) if int(p.name[len(STEP_PREFIX):]) > step]
    for p in newer:
        shutil.rmtree(p)
    return newer


def read_state(folder: str | Path) -> dict:
    path = Path(folder) / "state.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint state ({e.__class__.__name__}: {e})") from None


def load_training_state(folder: str | Path, model, optimizer, scheduler, precision, dist) -> dict:
    """Load a checkpoint into the (wrapped) model and optimizer in place; return its state.json."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    folder = Path(folder)
    state = read_state(folder)
    if state.get("world_size") != dist.world:
        raise CheckpointError(f"{folder}: written by {state.get('world_size')} processes, resumed with "
                              f"{dist.world}; resume with the same number")
    shard = folder / f"shard-{dist.rank if state['sharded'] else 0}.safetensors"
    try:
        tensors = load_file(shard)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{shard}: corrupt or truncated ({' '.join(str(e).split())[:160]})") from None
    model_sd, optim_sd = get_state_dict(model, optimizer)  # templates; also creates Adam's state
    expected, _ = _flatten(model_sd, optim_sd, dist)
    missing = sorted(set(expected) - set(tensors))
    if missing or any(tensors[k].shape != v.shape for k, v in expected.items()):
        bad = missing[0] if missing else next(k for k, v in expected.items() if tensors[k].shape != v.shape)
        raise CheckpointError(f"{shard}: does not match this model ({bad})")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])
    optim_sd["param_groups"] = state["param_groups"]
    # not strict: a 4-bit (QLoRA) layer lists its quantisation constants in state_dict() but takes
    # them back only through from_pretrained; they are frozen and rebuilt from base/, and every key
    # this model has was checked against the file above
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(strict=False))
    scheduler.load_state_dict(state["scheduler"])
    if precision.scaler and state.get("scaler"):
        precision.scaler.load_state_dict(state["scaler"])
    rng_file = folder / f"rng-{dist.rank}.json"
    try:
        set_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{rng_file}: unreadable ({e.__class__.__name__})") from None
    return state


def rng_state() -> dict:
    import random

    import numpy as np
    import torch

    np_state, py_state = np.random.get_state(), random.getstate()
    out = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state().tolist()
    return out


def set_rng_state(s: dict) -> None:
    import random

    import numpy as np
    import torch

    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    np.random.set_state((s["numpy"][0], np.asarray(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(s["cuda"], dtype=torch.uint8))


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def save_weights(path: str | Path, state_dict: dict) -> None:
    """Full weights as one safetensors file, atomically (the best state under keep_best)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_weights(path: str | Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated ({' '.join(str(e).split())[:160]})") from None

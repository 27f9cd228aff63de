"""Run a model over a tokenized dataset -> logits -> metrics. Shared by train, evaluate and compare.

Under several ranks each rank scores its share of the batches and the logits are gathered back
into dataset order, so every example counts exactly once whatever the world size.

A base model's score depends only on its weights, the eval examples as tokenized and how they are
run (precision, batch size, ...): `cached_score` keeps it under the user cache, so a sweep of runs
from one base scores it once.

`evaluate_saved` is launch/evaluate.py: a saved classifier scored on the rows and in the way its run
scored it (engine/run_settings.py), unless a flag says otherwise.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine import batching, classifiers, modeling, run_settings, sources
from engine import precision as precision_lib
from engine.batching import Tokenized, collate, eval_batches, model_inputs
from engine.distributed import Dist
from engine.metrics import classification_metrics
from engine.paths import user_cache_dir, write_json_atomic
from engine.precision import Precision
from engine.run_settings import RowsAsked


def predict(model, data: Tokenized, batch_size: int, precision, dist, pad_id: int,
            pad_left: bool = False, buckets: list[int] | None = None) -> np.ndarray:
    """Logits for every example, in dataset order, on every rank. With `buckets` (data.pad_buckets)
    every batch is also filled to batch_size rows (repeats, thrown away): one shape a bucket."""
    with dist.no_autograd():
        return _predict(model, data, batch_size, precision, dist, pad_id, pad_left, buckets)


def _predict(model, data: Tokenized, batch_size: int, precision, dist, pad_id: int, pad_left: bool,
             buckets: list[int] | None) -> np.ndarray:
    was_training = model.training
    model.eval()
    forward = dist.eval_module(model)
    mine = eval_batches(data.lengths, batch_size, dist.dp_world, dist.dp_rank)
    total = -(-len(data) // batch_size)
    rounds = -(-total // dist.dp_world)  # FSDP needs every rank to run the same number of forwards
    indices, chunks = [], []
    for r in range(rounds):
        idx = mine[r] if r < len(mine) else np.arange(1)  # a spare forward, thrown away
        batch = collate(data, np.resize(idx, batch_size) if buckets else idx, pad_id, pad_left, buckets=buckets)
        with precision.autocast():
            logits = forward(**model_inputs(batch, dist.device)).logits
        if r < len(mine):
            indices.append(idx)
            chunks.append(logits[:len(idx)].float().cpu().numpy())
    model.train(was_training)
    n_classes = chunks[0].shape[-1] if chunks else 0
    local = (np.concatenate(indices) if indices else np.zeros(0, np.int64),
             np.concatenate(chunks) if chunks else np.zeros((0, n_classes), np.float32))
    gathered = dist.all_gather_object(local)
    n_classes = max(g[1].shape[-1] for g in gathered)
    out = np.zeros((len(data), n_classes), dtype=np.float32)
    filled = np.zeros(len(data), dtype=np.int64)
    for idx, logits in gathered:
        if len(idx):  # a rank with no batch of its own sent nothing
            out[idx] = logits
            np.add.at(filled, idx, 1)
    # a gap would score as class 0 and a double count would hide one; either is a sharding bug
    if not (filled == 1).all():
        missing, twice = int((filled == 0).sum()), int((filled > 1).sum())
        raise RuntimeError(f"evaluation sharding: {missing} of {len(data)} examples not scored, "
                           f"{twice} scored more than once")
    return out


def evaluate(model, data: Tokenized, label_names: list[str], batch_size: int, precision, dist,
             pad_id: int, pad_left: bool = False, buckets: list[int] | None = None) -> dict:
    logits = predict(model, data, batch_size, precision, dist, pad_id, pad_left, buckets)
    return classification_metrics(logits, data.labels, label_names)


def eval_set_digest(data: Tokenized) -> str:
    """The eval examples exactly as the model sees them: token ids (so tokenizer, max_length and
    truncation are in it) and labels."""
    h = hashlib.sha256()
    for ids in data.ids:
        h.update(np.asarray(ids, dtype=np.int32).tobytes())
        h.update(b"\0")
    h.update(np.asarray(data.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


# bumped when classification_metrics gains a field (2: accuracy_se), so an older stored score is
# scored again instead of lacking it
SCORE_FORMAT = 2


def cached_score(key: dict | None, score: Callable[[], dict], dist, folder: Path | None = None) -> tuple[dict, bool]:
    """(metrics, reused): rank 0 looks `key` up and every rank follows; on a miss all ranks score
    (collectives inside) and rank 0 stores the result. key None (rank != 0) or {} scores always."""
    file = None
    if dist.is_main and key:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        file = (folder or user_cache_dir() / "base_scores") / f"{digest}.json"
    found = None
    if file is not None and file.exists():
        try:
            saved = json.loads(file.read_text(encoding="utf-8"))
            found = saved["metrics"] if saved.get("key") == key and saved.get("format") == SCORE_FORMAT else None
        except (OSError, ValueError, KeyError):  # damaged: score again
            found = None
    found = dist.broadcast_object(found)
    if found is not None:
        return found, True
    metrics = score()
    if file is not None:
        try:
            write_json_atomic(file, {"key": key, "format": SCORE_FORMAT, "metrics": metrics})
        except OSError:  # an unwritable cache costs a base eval per run, nothing else
            pass
    return metrics, False


@contextlib.contextmanager
def token_folder(cache_dir: str | None = None):
    """Where a scoring command (evaluate, predict) keeps its token store: `cache_dir` where one is
    named, else a temporary folder removed afterwards. Such texts are seldom scored twice with the
    same cut, so a store kept per call would pile up in the user cache without bound, and
    tokenizing again costs little beside the forward passes."""
    if cache_dir:
        yield cache_dir
        return
    with tempfile.TemporaryDirectory(prefix="sentiment-engine-tokens-") as folder:
        yield folder


def score_examples(loaded: classifiers.Loaded, examples: sources.Examples, cut: dict, batch_size: int,
                   precision_name: str, cache_dir: str | None = None) -> dict:
    """Metrics of a loaded classifier on labelled examples, one process; `cut`: max_length,
    truncation, head_tokens."""
    dist = Dist()
    with token_folder(cache_dir) as folder:
        tokens = batching.tokenize(examples, loaded.tokenizer, cut["max_length"], folder,
                                   truncation=cut["truncation"], head_tokens=cut["head_tokens"])
        return evaluate(loaded.model.to(dist.device), tokens, loaded.label_names, batch_size,
                        Precision(precision_name, dist.device), dist, loaded.tokenizer.pad_token_id,
                        loaded.tokenizer.padding_side == "left")


def evaluate_pretrained(model_path: str, data_cfg, split: str, batch_size: int = 64,
                        precision_name: str = "fp32", trust_remote_code: bool = False) -> dict:
    """Load any saved or hub classifier and evaluate it on one split of `data_cfg` as given (its cut,
    the whole split or a seeded eval_size subset), labels read from its config."""
    loaded = classifiers.load(model_path, trust_remote_code=trust_remote_code)
    modeling.check_max_length(loaded.model, data_cfg.max_length, model_path, key="--max-length")
    examples = sources.load_eval_split(data_cfg, split, data_cfg.label_names or loaded.label_names)
    cut = {"max_length": data_cfg.max_length, "truncation": data_cfg.truncation, "head_tokens": data_cfg.head_tokens}
    metrics = score_examples(loaded, examples, cut, batch_size, precision_name, data_cfg.cache_dir)
    return {**metrics, "model": model_path, "data": examples.origin, "split": split}


def evaluate_saved(model: str, rows: RowsAsked, asked: dict, base: str | None = None,
                   trust_remote_code: bool = False, say: Callable[[str], None] = run_settings.say) -> dict:
    """launch/evaluate.py: `model` scored as its run scored it (the rows, cut, precision and batch
    size in its run_settings.json), each given flag (`rows`, `asked`; None: not given) overriding
    one setting, with a note saying so. Every input is checked before anything is printed."""
    loaded = classifiers.load(model, base, trust_remote_code)
    reading, notes = run_settings.reading(loaded.settings, asked, "fp32", modeling.max_positions(loaded.model))
    modeling.check_max_length(loaded.model, reading.max_length, model, key="--max-length")
    examples, split, row_notes = run_settings.select_rows(loaded.settings, rows, loaded.label_names)
    for note in notes + row_notes:
        say(note)
    choice = precision_lib.choose(reading.precision, Dist().device, say=say, key="--precision")
    metrics = score_examples(loaded, examples, reading.as_dict(), reading.batch_size, choice.name)
    return {**metrics, "model": model, **({"base": loaded.base} if loaded.base else {}),
            "data": examples.origin, "split": split, "read_as": {**reading.as_dict(), "precision": choice.name},
            "settings": str(loaded.settings.file) if loaded.settings else None, "overrides": notes + row_notes}

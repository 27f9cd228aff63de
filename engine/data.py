"""Data: sources -> labelled examples -> token ids (cached) -> length-grouped, rank-sharded batches.

Sources, by what `data.source` names:
  - a hub dataset name (`imdb`), read with `datasets.load_dataset`;
  - a folder holding `<split>.parquet|csv|tsv|jsonl`, or the aclImdb layout `<split>/pos/*.txt`,
    or `<split>_text.txt` + `<split>_labels.txt` (TweetEval);
  - a single file (it is the train split; carve an eval set with `data.holdout_size`).
Every problem with the data stops with a DataError naming the file, the row and the column.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from engine.config import DataConfig
from engine import paths
from engine.errors import DataError, MissingPackageError
from engine.paths import is_local, resolve

TABLE_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl")


@dataclass
class Examples:
    texts: list[str]
    labels: np.ndarray  # int64 class ids
    origin: str  # where they came from, for messages and metrics


@dataclass
class Splits:
    train: Examples
    eval: Examples
    label_names: list[str]
    test: Optional[Examples] = None  # data.test_split: scored once at the end


# --------------------------------------------------------------------------------------------
# Reading sources


def load_splits(cfg: DataConfig, seed: int,
                model_names: Optional[Callable[[], Optional[list[str]]]] = None) -> Splits:
    """Read, filter, label-map and subsample the train and eval splits a recipe asks for.

    `model_names()`: the class names the model's config gives (modeling.config_label_names), asked
    only for integer labels that neither the recipe nor the source names (it may reach the hub).
    """
    train_raw = read_split(cfg, cfg.train_split)
    if cfg.holdout_size:
        names, train_ids = label_ids(train_raw, cfg, None, model_names)
        train_all = Examples(train_raw.texts, train_ids, train_raw.origin)
        if cfg.holdout_size >= len(train_all.texts):
            raise DataError(f"{train_raw.origin}: data.holdout_size={cfg.holdout_size} leaves no "
                            f"training examples (split has {len(train_all.texts)})")
        held = stratified_subset(train_all.labels, cfg.holdout_size, seed)
        rest = np.setdiff1d(np.arange(len(train_all.texts)), held)
        train, evals = take(train_all, rest), take(train_all, held)
        evals.origin += f" (held out: {cfg.holdout_size}, seed {seed})"
    else:
        eval_raw = read_split(cfg, cfg.eval_split)
        names, train_ids = label_ids(train_raw, cfg, None, model_names)
        _, eval_ids = label_ids(eval_raw, cfg, names)
        train = Examples(train_raw.texts, train_ids, train_raw.origin)
        evals = Examples(eval_raw.texts, eval_ids, eval_raw.origin)
    if cfg.train_size is not None and cfg.train_size < len(train.texts):
        train = take(train, stratified_subset(train.labels, cfg.train_size, seed))
    if cfg.eval_size is not None and cfg.eval_size < len(evals.texts):
        evals = take(evals, stratified_subset(evals.labels, cfg.eval_size, seed + 1))
    test = None
    if cfg.test_split:
        test_raw = read_split(cfg, cfg.test_split)
        test = Examples(test_raw.texts, label_ids(test_raw, cfg, names)[1], test_raw.origin)
        if cfg.test_size is not None and cfg.test_size < len(test.texts):
            test = take(test, stratified_subset(test.labels, cfg.test_size, seed + 2))
    return Splits(train, evals, names, test)


def load_eval_split(cfg: DataConfig, split: str, label_names: Optional[list[str]] = None,
                    seed: int = 42) -> Examples:
    """One split for evaluation only (launch/evaluate.py), labels mapped onto `label_names`."""
    raw = read_split(cfg, split)
    _, ids = label_ids(raw, cfg, label_names)
    examples = Examples(raw.texts, ids, raw.origin)
    if cfg.eval_size is not None and cfg.eval_size < len(ids):
        examples = take(examples, stratified_subset(ids, cfg.eval_size, seed + 1))
    return examples


@dataclass
class RawSplit:
    texts: list[str]
    labels: list  # ints or strings, as stored
    rows: list[int]  # 1-based row numbers in the source, for messages
    column: str
    origin: str
    label_names: Optional[list[str]]  # when the source declares them (hub ClassLabel, mapping.txt)


def read_split(cfg: DataConfig, split: str) -> RawSplit:
    if is_local(cfg.source):
        try:
            path = Path(resolve(cfg.source)).expanduser()
        except MissingPackageError as e:
            raise DataError(str(e)) from None
        frame, origin, names = _read_local(path, split, cfg)
    else:
        frame, origin, names = _read_hub(cfg.source, split)
    for old, new in cfg.rename_columns.items():
        if old in frame.columns:
            if new in frame.columns:
                raise DataError(f"{origin}: data.rename_columns renames '{old}' to '{new}', but both "
                                f"columns are there")
            frame = frame.rename(columns={old: new})
    for column, value in cfg.where.items():
        if column not in frame.columns:
            raise DataError(f"{origin}: data.where names column '{column}', which is not there "
                            f"(columns: {', '.join(map(str, frame.columns))})")
        frame = frame[frame[column] == value]
    for column, key in ((cfg.text_column, "data.text_column"), (cfg.label_column, "data.label_column")):
        if column not in frame.columns:
            raise DataError(f"{origin}: no column '{column}' ({key}); columns: "
                            f"{', '.join(map(str, frame.columns))}")
    if len(frame) == 0:
        raise DataError(f"{origin}: split '{split}' is empty" + (" after data.where" if cfg.where else ""))
    texts = frame[cfg.text_column].tolist()
    for row, text in zip(frame.index, texts):
        if not isinstance(text, str):
            raise DataError(f"{origin}: row {row + 1}, column '{cfg.text_column}': expected text, "
                            f"got {text!r}")
    rows = [int(r) + 1 for r in frame.index]
    return RawSplit(texts, frame[cfg.label_column].tolist(), rows, cfg.label_column, origin, names)


def _read_hub(name: str, split: str):
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub client raises many types; all mean "cannot get it"
        raise DataError(f"{name}: cannot load split '{split}' from the hub "
                        f"({e.__class__.__name__}: {' '.join(str(e).split())[:200]})") from None
    names = None
    for feature in ds.features.values():
        if hasattr(feature, "names"):
            names = list(feature.names)
    return ds.to_pandas(), f"{name}[{split}]", names


def _read_local(path: Path, split: str, cfg: DataConfig):
    if not path.exists():
        raise DataError(f"{path}: data.source does not exist")
    if path.is_file():
        if split != cfg.train_split:
            raise DataError(f"{path}: a single file holds only the train split; set "
                            f"data.eval_split=null and data.holdout_size=N to evaluate on held-out rows")
        return read_table(path, cfg.encoding), str(path), None
    for suffix in TABLE_SUFFIXES:
        candidate = path / f"{split}{suffix}"
        if candidate.exists():
            return read_table(candidate, cfg.encoding), str(candidate), None
    if (path / split / "pos").is_dir() and (path / split / "neg").is_dir():
        return _read_aclimdb(path / split, cfg.encoding), str(path / split), ["neg", "pos"]
    if (path / f"{split}_text.txt").exists():
        return _read_text_label_pair(path, split, cfg)
    present = sorted(p.name for p in path.iterdir())
    raise DataError(f"{path}: no split '{split}' (looked for {split}.parquet/.csv/.tsv/.jsonl, "
                    f"{split}/pos|neg/*.txt, {split}_text.txt); folder holds: {', '.join(present[:12])}")


def decode_file(path: Path, encoding: str) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line}: text is not valid {encoding} "
                        f"(set data.encoding, e.g. latin-1)") from None
    except LookupError:
        raise DataError(f"{path}: unknown data.encoding '{encoding}'") from None


def read_table(path: Path, encoding: str):
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix in (".csv", ".tsv"):
            text = decode_file(path, encoding)
            if suffix == ".tsv":  # TSV cells are not quoted (SST-2 sentences hold bare quotes)
                frame = pd.read_csv(io.StringIO(text), sep="\t", quoting=3, dtype=object)
            else:
                frame = pd.read_csv(io.StringIO(text), dtype=object)
        elif suffix == ".jsonl":
            frame = pd.read_json(io.StringIO(decode_file(path, encoding)), lines=True, dtype=False)
        else:
            raise DataError(f"{path}: unsupported file type '{suffix}' (use {', '.join(TABLE_SUFFIXES)})")
    except DataError:
        raise
    except Exception as e:  # pandas/pyarrow parse errors come in many types
        raise DataError(f"{path}: cannot parse ({e.__class__.__name__}: {' '.join(str(e).split())[:200]})") from None
    return frame.reset_index(drop=True)


def _read_aclimdb(folder: Path, encoding: str):
    import pandas as pd

    texts, labels = [], []
    for label, sub in enumerate(("neg", "pos")):
        for file in sorted((folder / sub).glob("*.txt")):
            texts.append(decode_file(file, encoding))
            labels.append(label)
    return pd.DataFrame({"text": texts, "label": labels})


def _read_text_label_pair(path: Path, split: str, cfg: DataConfig):
    import pandas as pd

    text_file, label_file = path / f"{split}_text.txt", path / f"{split}_labels.txt"
    texts = decode_file(text_file, cfg.encoding).splitlines()
    if not label_file.exists():
        raise DataError(f"{label_file}: missing (it pairs with {text_file.name})")
    labels = decode_file(label_file, cfg.encoding).splitlines()
    if len(texts) != len(labels):
        raise DataError(f"{label_file}: {len(labels)} labels for {len(texts)} lines of {text_file.name}")
    names = None
    mapping = path / "mapping.txt"
    if mapping.exists():
        pairs = [line.split("\t") for line in decode_file(mapping, cfg.encoding).splitlines() if line.strip()]
        names = [p[1].strip() for p in sorted(pairs, key=lambda p: int(p[0]))]
    frame = pd.DataFrame({cfg.text_column: texts, cfg.label_column: labels})
    return frame, str(text_file), names


# --------------------------------------------------------------------------------------------
# Labels and subsets


def label_ids(raw: RawSplit, cfg: DataConfig, names: Optional[list[str]],
              model_names: Optional[Callable[[], Optional[list[str]]]] = None):
    """Map stored labels to class ids; returns (class names, ids).

    Class names, first found: `names` (the train split's, when mapping eval), data.label_names,
    the names the source declares (hub ClassLabel, mapping.txt, aclImdb's neg/pos), the model's
    own names when integer labels count exactly as many classes, else LABEL_i.
    """
    values, rows, column = raw.labels, raw.rows, raw.column
    for v, row in zip(values, rows):
        if v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip()):
            raise DataError(f"{raw.origin}: row {row}, column '{column}': missing label")
    names = names or cfg.label_names or raw.label_names
    as_int = [_as_int(v) for v in values]
    if all(v is not None for v in as_int):
        if names is None:
            n_classes = max(max(as_int) + 1, 2)
            named = model_names() if model_names else None
            if named and len(named) == n_classes:
                names = list(named)
            else:
                names = [f"LABEL_{i}" for i in range(n_classes)]
        for v, row in zip(as_int, rows):
            if not 0 <= v < len(names):
                raise DataError(f"{raw.origin}: row {row}, column '{column}': label {v} out of range "
                                f"0..{len(names) - 1} ({', '.join(names)})")
        return names, np.asarray(as_int, dtype=np.int64)
    strings = [str(v).strip() for v in values]
    if names is None:
        names = sorted(set(strings))
        if len(names) < 2:
            raise DataError(f"{raw.origin}: column '{column}' holds one class only ({names[0]!r}); "
                            f"list the classes in data.label_names")
    index = {n.lower(): i for i, n in enumerate(names)}
    ids = []
    for v, row in zip(strings, rows):
        if v.lower() not in index:
            raise DataError(f"{raw.origin}: row {row}, column '{column}': unknown label {v!r} "
                            f"(known: {', '.join(names)})")
        ids.append(index[v.lower()])
    return list(names), np.asarray(ids, dtype=np.int64)


def _as_int(value):
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` indices, seeded, with each class in its original proportion (sorted)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    key = np.empty(len(labels))
    for c in np.unique(labels):
        members = perm[labels[perm] == c]
        # interleave classes: the k-th member of a class sits at k / class size
        key[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.sort(np.argsort(key, kind="stable")[:n])


def take(ex: Examples, idx: np.ndarray) -> Examples:
    return Examples([ex.texts[i] for i in idx], ex.labels[idx], ex.origin)


# --------------------------------------------------------------------------------------------
# Tokenization, cached


@dataclass
class Tokenized:
    ids: list[np.ndarray]  # one int32 array per example, unpadded
    labels: np.ndarray

    def __len__(self):
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))


def default_cache_dir() -> Path:
    return paths.user_cache_dir() / "tokens"


def tokenize(examples: Examples, tokenizer, max_length: int, cache_dir: Optional[str] = None,
             truncation: str = "head", head_tokens: int = 0) -> Tokenized:
    """Token ids for every text, cut to max_length (see DataConfig.truncation); read from the cache
    when seen before."""
    digest = hashlib.sha256()
    digest.update(_tokenizer_fingerprint(tokenizer).encode())
    digest.update(f"{max_length}|{truncation}|{head_tokens if truncation == 'head_tail' else 0}".encode())
    for text in examples.texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    file = folder / f"{digest.hexdigest()[:32]}.npz"
    if file.exists():
        try:
            with np.load(file) as z:
                flat, offsets = z["ids"], z["offsets"]
            return Tokenized(np.split(flat, offsets[1:-1]), examples.labels)
        except Exception:  # a damaged cache file is rebuilt, never trusted
            pass
    if truncation == "head":
        enc = tokenizer(examples.texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
    else:
        enc = _cut_from_both_ends(examples.texts, tokenizer, max_length, truncation, head_tokens)
    ids = [np.asarray(x, dtype=np.int32) for x in enc]
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])])
    folder.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, ids=np.concatenate(ids) if ids else np.zeros(0, np.int32), offsets=offsets)
    os.replace(tmp, file)
    return Tokenized(ids, examples.labels)


def _cut_from_both_ends(texts: list[str], tokenizer, max_length: int, truncation: str,
                        head_tokens: int) -> list[list[int]]:
    """tail: the last tokens of each text; head_tail: its first head_tokens and its last ones;
    max_length in all, the tokenizer's own special tokens included."""
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    keep_head = head_tokens if truncation == "head_tail" else 0
    if budget - keep_head < 1:
        raise DataError(f"data.max_length={max_length} leaves {budget} tokens after the tokenizer's "
                        f"{max_length - budget} special tokens: no room for a tail after "
                        f"data.head_tokens={keep_head}")
    prefix, suffix = special_token_layout(tokenizer)
    # verbose=False: texts longer than the model are expected here, they are cut below
    bodies = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    out = []
    for body in bodies:
        if len(body) > budget:
            body = body[:keep_head] + body[len(body) - (budget - keep_head):]
        out.append(prefix + list(body) + suffix)
    return out


def special_token_layout(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text ([CLS] / [SEP], <s> /
    </s>, a decoder's BOS, or none), read from its own output on a probe text.

    transformers 5's fast tokenizers have no build_inputs_with_special_tokens; their
    post-processor only runs inside encoding, so the layout is read from an encoded probe.
    """
    enc = tokenizer("a b c", add_special_tokens=True, return_special_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["special_tokens_mask"]
    body = [i for i, m in enumerate(mask) if not m]
    if not body:
        raise DataError(f"{type(tokenizer).__name__}: the probe text tokenizes to special tokens only")
    prefix, suffix = ids[:body[0]], ids[body[-1] + 1:]
    if len(prefix) + len(suffix) != tokenizer.num_special_tokens_to_add(pair=False) or \
            any(mask[body[0]:body[-1] + 1]):
        raise DataError(f"{type(tokenizer).__name__}: its special tokens are not a fixed prefix and "
                        f"suffix around the text; use data.truncation=head")
    return list(prefix), list(suffix)


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # runtime settings that each call rewrites, not the vocabulary
        spec.pop("padding", None)
        body = json.dumps(spec, sort_keys=True)
    else:
        body = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = f"{type(tokenizer).__name__}|{tokenizer.padding_side}|{tokenizer.truncation_side}"
    return hashlib.sha256((body + extra).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Batches


def train_steps(lengths: np.ndarray, batch_size: int, grad_accum: int, epoch: int, seed: int,
                world: int = 1, rank: int = 0, group_by_length: bool = True) -> list[list[np.ndarray]]:
    """This rank's micro-batches (index arrays) for every optimizer step of one epoch.

    The plan depends only on the global step size (batch_size x grad_accum x world), the seed and
    the epoch, so 1 process x batch 8 and 2 ranks x batch 4 see the same examples in each step.
    Incomplete last steps are dropped so every rank has work in every step.
    """
    step = batch_size * grad_accum * world
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    n_steps = len(order) // step
    order = order[: n_steps * step]
    if group_by_length:
        # sort inside windows of 64 steps: batches hold similar lengths, the epoch stays shuffled
        window = step * 64
        chunks = [order[i:i + window] for i in range(0, len(order), window)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks]) if chunks else order
        groups = order.reshape(n_steps, step)[rng.permutation(n_steps)]
    else:
        groups = order.reshape(n_steps, step)
    plan = []
    for group in groups:
        micro = [group[(m * world + rank) * batch_size:(m * world + rank + 1) * batch_size]
                 for m in range(grad_accum)]
        plan.append(micro)
    return plan


def eval_batches(lengths: np.ndarray, batch_size: int, world: int = 1, rank: int = 0) -> list[np.ndarray]:
    """This rank's share of the eval set, longest first (padding stays small); every index once."""
    order = np.argsort(-lengths, kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return batches[rank::world]


def collate(data: Tokenized, idx: np.ndarray, pad_id: int, pad_left: bool = False,
            multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Pad one batch to its own longest sequence (rounded up to `multiple_of`)."""
    seqs = [data.ids[i] for i in idx]
    longest = max(len(s) for s in seqs)
    width = -(-longest // multiple_of) * multiple_of
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, s in enumerate(seqs):
        if pad_left:
            input_ids[row, width - len(s):], mask[row, width - len(s):] = s, 1
        else:
            input_ids[row, :len(s)], mask[row, :len(s)] = s, 1
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(data.labels[idx]),
    }
    if pad_left:  # positions count from the first real token, as they would without padding
        batch["position_ids"] = torch.from_numpy(np.clip(mask.cumsum(axis=1) - 1, 0, None))
    return batch


def model_inputs(batch: dict, device) -> dict:
    """The tensors the model's forward takes (all but labels), on `device`."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labels"}


def prefetch(batches: Iterator, depth: int = 2) -> Iterator:
    """Build the next batches on a background thread while the current step computes."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work():
        try:
            for b in batches:
                q.put(b)
        except BaseException as e:  # surface worker errors in the training thread
            q.put(e)
        q.put(done)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item

"""Sources -> labelled examples: read a split, keep the rows the recipe selects, map its labels to
class ids, take seeded subsets.

Each kind of source is read by engine/readers.py (a chunk at a time), each split's texts go to an
Arrow file on disk (engine/columns.py: memory holds labels and row numbers, not the text), and
labels become class ids by engine/labels.py's one rule. Every problem with the data stops with a
DataError naming the file, the row and the column.
A split with an `input_ids` column (lists of token ids) and no text column is pre-tokenized: its
ids go to the token store as they are (engine/batching.py).
engine/batching.py turns the examples into token ids and batches.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from engine import readers
from engine.columns import Column, ColumnFile, chunks, scratch_dir
from engine.config import DataConfig
from engine.errors import DataError
from engine.labels import label_ids, numbered
from engine.readers import TABLE_SUFFIXES, decode_file, read_table

# what other modules have long imported from here; each lives in the module of its job
__all__ = ["TABLE_SUFFIXES", "Column", "Examples", "RawSplit", "Splits", "chunks", "decode_file", "label_ids",
           "load_eval_split", "load_splits", "numbered", "read_split", "read_table", "stratified_subset", "take"]

PRETOKENIZED_COLUMN = "input_ids"


@dataclass
class Examples:
    texts: Sequence  # str per example (a list, or a Column read from disk); token-id lists if pretokenized
    labels: np.ndarray  # int64 class ids
    origin: str  # where they came from, for messages and metrics
    rows: np.ndarray | None = None  # 1-based source rows, for messages about an example
    pretokenized: bool = False  # the source gave token ids (an `input_ids` column), not text


@dataclass
class Splits:
    train: Examples
    eval: Examples
    label_names: list[str]
    test: Examples | None = None  # data.test_split: scored once at the end


def load_splits(cfg: DataConfig, seed: int,
                model_names: Callable[[], list[str] | None] | None = None) -> Splits:
    """Read, filter, label-map and subsample the train and eval splits a recipe asks for.

    `model_names()`: the class names the model's config gives (modeling.config_label_names), asked
    only for integer labels that neither the recipe nor the source names (it may reach the hub).
    Subsets are drawn from the labels alone; the texts stay on disk until tokenized.
    """
    train_raw = read_split(cfg, cfg.train_split)
    if cfg.holdout_size:
        names, train_ids = label_ids(train_raw, cfg, None, model_names)
        train_all = _examples(train_raw, train_ids)
        if cfg.holdout_size >= len(train_all.texts):
            raise DataError(f"{train_raw.origin}: data.holdout_size={cfg.holdout_size} leaves no "
                            f"training examples (split has {len(train_all.texts)})")
        held = stratified_subset(train_all.labels, cfg.holdout_size, seed)
        rest = np.setdiff1d(np.arange(len(train_all.texts)), held)
        train, evals = take(train_all, rest), take(train_all, held)
        evals.origin += f" (held out: {cfg.holdout_size}, seed {seed})"
    else:
        eval_raw = read_split(cfg, cfg.eval_split)
        names, train_ids = label_ids(train_raw, cfg, None, model_names, also=eval_raw.labels)
        _, eval_ids = label_ids(eval_raw, cfg, names)
        train = _examples(train_raw, train_ids)
        evals = _examples(eval_raw, eval_ids)
    if cfg.train_size is not None and cfg.train_size < len(train.texts):
        train = take(train, stratified_subset(train.labels, cfg.train_size, seed))
    if cfg.eval_size is not None and cfg.eval_size < len(evals.texts):
        evals = take(evals, stratified_subset(evals.labels, cfg.eval_size, seed + 1))
    test = None
    if cfg.test_split:
        test_raw = read_split(cfg, cfg.test_split)
        test = _examples(test_raw, label_ids(test_raw, cfg, names)[1])
        if cfg.test_size is not None and cfg.test_size < len(test.texts):
            test = take(test, stratified_subset(test.labels, cfg.test_size, seed + 2))
    return Splits(train, evals, names, test)


def load_eval_split(cfg: DataConfig, split: str, label_names: list[str] | None = None,
                    seed: int = 42) -> Examples:
    """One split for evaluation only (launch/evaluate.py), labels mapped onto `label_names`."""
    raw = read_split(cfg, split)
    _, ids = label_ids(raw, cfg, label_names)
    examples = _examples(raw, ids)
    if cfg.eval_size is not None and cfg.eval_size < len(ids):
        examples = take(examples, stratified_subset(ids, cfg.eval_size, seed + 1))
    return examples


@dataclass
class RawSplit:
    texts: Sequence  # str per row (a Column on disk); token-id lists when pretokenized
    labels: list  # ints or strings, as stored
    rows: Sequence[int]  # 1-based row numbers in the source, for messages
    column: str
    origin: str
    label_names: list[str] | None  # when the source declares them (hub ClassLabel, mapping.txt)
    pretokenized: bool = False


def _examples(raw: RawSplit, ids: np.ndarray) -> Examples:
    return Examples(raw.texts, ids, raw.origin, np.asarray(raw.rows, dtype=np.int64), raw.pretokenized)


def read_split(cfg: DataConfig, split: str) -> RawSplit:
    frames, origin, names = readers.open_split(cfg, split)
    file, labels, rows = ColumnFile(scratch_dir(cfg.cache_dir)), [], []
    pretokenized = None
    try:
        offset = 0
        for frame in frames:  # one chunk of the source at a time; its row numbers run on
            frame.index = pd.RangeIndex(offset, offset + len(frame))
            offset += len(frame)
            frame, column = _select(frame, cfg, origin)
            pretokenized = column != cfg.text_column
            values = _checked_values(frame, column, origin)
            file.append(values)
            labels.extend(frame[cfg.label_column].tolist())
            rows.append(frame.index.to_numpy() + 1)
    finally:
        file.close()
    if not labels:
        raise DataError(f"{origin}: split '{split}' is empty" + (" after data.where" if cfg.where else ""))
    return RawSplit(Column(file), labels, np.concatenate(rows), cfg.label_column, origin, names,
                    bool(pretokenized))


def _select(frame: pd.DataFrame, cfg: DataConfig, origin: str) -> tuple[pd.DataFrame, str]:
    """One chunk renamed and filtered as the recipe says; (chunk, the column holding the inputs)."""
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
        frame = frame[where_matches(frame[column], value)]
    text = cfg.text_column
    if text not in frame.columns and PRETOKENIZED_COLUMN in frame.columns:
        text = PRETOKENIZED_COLUMN
    for column, key in ((text, "data.text_column"), (cfg.label_column, "data.label_column")):
        if column not in frame.columns:
            raise DataError(f"{origin}: no column '{column}' ({key}); columns: "
                            f"{', '.join(map(str, frame.columns))}")
    return frame, text


def where_matches(cells: pd.Series, value) -> np.ndarray:
    """The cells data.where keeps: equal to `value`, or spelling it (CSV and TSV cells are all text,
    JSON and parquet cells typed): compared as text, surrounding spaces aside, a boolean's case too,
    so 5 keeps "5" and 5, "5" keeps 5, true keeps "True"."""
    hit = (cells == value).to_numpy(dtype=bool, copy=True)
    spelled = _as_text(value)
    if spelled is not None:
        hit |= np.fromiter((_as_text(c) == spelled for c in cells), dtype=bool, count=len(cells))
    return hit


def _as_text(value) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None  # a missing cell matches nothing
    text = str(value).strip()
    return text.lower() if text.lower() in ("true", "false") else text


def _checked_values(frame: pd.DataFrame, column: str, origin: str) -> pa.Array:
    """The chunk's texts (or token-id lists) as Arrow, every row checked."""
    values = frame[column].tolist()
    if column != PRETOKENIZED_COLUMN:
        for row, text in zip(frame.index, values, strict=True):
            if not isinstance(text, str):
                missing = text is None or (isinstance(text, float) and text != text)
                got = "an empty cell" if missing else _short(text)
                raise DataError(f"{origin}: row {row + 1}, column '{column}': expected text, got {got}")
        return pa.array(values, type=pa.large_string())
    ids = []
    for row, value in zip(frame.index, values, strict=True):
        arr = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
        if arr is None or arr.ndim != 1 or len(arr) == 0 or arr.dtype.kind not in "iu" or arr.min() < 0:
            raise DataError(f"{origin}: row {row + 1}, column '{column}': expected a non-empty list of "
                            f"token ids (integers >= 0), got {_short(value)}")
        ids.append(arr.astype(np.int64))
    return pa.array(ids, type=pa.list_(pa.int64()))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------------------
# Subsets


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
    texts = ex.texts.take(idx) if isinstance(ex.texts, Column) else [ex.texts[i] for i in idx]
    return Examples(texts, ex.labels[idx], ex.origin, None if ex.rows is None else ex.rows[idx], ex.pretokenized)

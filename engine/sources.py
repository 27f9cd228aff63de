"""Sources -> labelled examples: read a split, map its labels to class ids, take seeded subsets.

Sources, by what `data.source` names:
  - a hub dataset name (`imdb`), read with `datasets.load_dataset`;
  - a folder holding `<split>.parquet|csv|tsv|jsonl`, or the aclImdb layout `<split>/pos/*.txt`,
    or `<split>_text.txt` + `<split>_labels.txt` (TweetEval);
  - a single file (it is the train split; carve an eval set with `data.holdout_size`).
Every problem with the data stops with a DataError naming the file, the row and the column.
A split with an `input_ids` column (lists of token ids) and no text column is pre-tokenized: its
ids go to the token store as they are (engine/batching.py).
Sources are read in chunks (pandas' chunked readers, pyarrow's record batches) and each split's
texts are written to an Arrow file on disk: memory holds labels and row numbers, not the text.
engine/batching.py turns the examples into token ids and batches.
"""
from __future__ import annotations

import codecs
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from engine import paths
from engine.config import DataConfig
from engine.errors import DataError, MissingPackageError
from engine.paths import exists, is_local, resolve

TABLE_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl")
# a source is parsed CHUNK_ROWS rows at a time (about 25 MB of reviews) and its texts are kept on
# disk in record batches of BATCH_ROWS: what is resident while reading is one chunk, not the file
CHUNK_ROWS = 20_000
BATCH_ROWS = 2_048
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


# --------------------------------------------------------------------------------------------
# A split's column on disk


class _ColumnFile:
    """One column of a split in an Arrow IPC file, written a chunk at a time and read back a
    record batch at a time through plain reads (no memory map: the text read stays out of the
    process's resident memory). The file is unlinked once open, so nothing outlives the process."""

    def __init__(self):
        folder = paths.user_cache_dir() / "sources"
        folder.mkdir(parents=True, exist_ok=True)
        _remove_orphans(folder)
        fd, self.path = tempfile.mkstemp(prefix=f"{os.getpid()}.", suffix=".arrow", dir=folder)
        os.close(fd)
        self._sink = None
        self._starts = [0]
        self._cached: tuple[int, pa.Array] | None = None

    def append(self, values: pa.Array) -> None:
        for start in range(0, len(values), BATCH_ROWS):
            batch = pa.record_batch([values.slice(start, BATCH_ROWS)], names=["v"])
            if self._sink is None:
                self._sink = pa.ipc.new_file(self.path, batch.schema)
            self._sink.write_batch(batch)
            self._starts.append(self._starts[-1] + len(batch))

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._reader = pa.ipc.open_file(pa.OSFile(self.path))
        os.unlink(self.path)
        self._starts = np.asarray(self._starts, dtype=np.int64)

    def __len__(self):
        return int(self._starts[-1])

    def values(self, idx: np.ndarray) -> list:
        """The values at positions `idx`, in that order (a run of sorted positions reads each batch once)."""
        out = [None] * len(idx)
        batch_of = np.searchsorted(self._starts, idx, side="right") - 1
        cuts = np.flatnonzero(np.diff(batch_of)) + 1
        for run in np.split(np.arange(len(idx)), cuts):
            if not len(run):
                continue
            b = int(batch_of[run[0]])
            if self._cached is None or self._cached[0] != b:
                self._cached = (b, self._reader.get_batch(b).column(0))
            local = pa.array(idx[run] - self._starts[b])
            for j, v in zip(run, self._cached[1].take(local).to_pylist(), strict=True):
                out[j] = v
        return out


def _remove_orphans(folder: Path) -> None:
    """Column files of processes that were killed before they unlinked theirs (`<pid>.*.arrow`)."""
    for file in folder.glob("*.arrow"):
        pid = file.name.split(".", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            file.unlink(missing_ok=True)


class Column(Sequence):
    """A split's texts (or token-id lists) kept on disk: `index` picks and orders the rows, so a
    subset is an index array, and a million reviews cost their index in memory, not their text."""

    def __init__(self, file: _ColumnFile, index: np.ndarray | None = None):
        self._file = file
        self.index = np.arange(len(file), dtype=np.int64) if index is None else index

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Column(self._file, self.index[i])
        return self._file.values(self.index[[i]])[0]

    def __iter__(self):
        for chunk in self.chunks():
            yield from chunk

    def chunks(self, size: int = BATCH_ROWS):
        """The values as lists of at most `size`, in order."""
        for start in range(0, len(self.index), size):
            yield self._file.values(self.index[start:start + size])

    def take(self, idx: np.ndarray) -> Column:
        return Column(self._file, self.index[idx])

    def __eq__(self, other):
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    __hash__ = None

    def __add__(self, other):
        return list(self) + list(other)

    def __radd__(self, other):
        return list(other) + list(self)

    def __repr__(self):
        return f"Column({len(self)} rows)"


def chunks(values: Sequence, size: int = BATCH_ROWS):
    """A Column's or a list's values as lists of at most `size`, in order."""
    if isinstance(values, Column):
        yield from values.chunks(size)
    else:
        for start in range(0, len(values), size):
            yield list(values[start:start + size])


# --------------------------------------------------------------------------------------------
# Reading sources


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
    if is_local(cfg.source):
        try:
            path = Path(resolve(cfg.source)).expanduser()
        except MissingPackageError as e:
            raise DataError(str(e)) from None
        frames, origin, names = _read_local(path, split, cfg)
    else:
        # the label column's name on the hub, before data.rename_columns
        label = next((old for old, new in cfg.rename_columns.items() if new == cfg.label_column), cfg.label_column)
        frames, origin, names = _read_hub(cfg.source, split, label)
    file, labels, rows = _ColumnFile(), [], []
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
        frame = frame[frame[column] == value]
    text = cfg.text_column
    if text not in frame.columns and PRETOKENIZED_COLUMN in frame.columns:
        text = PRETOKENIZED_COLUMN
    for column, key in ((text, "data.text_column"), (cfg.label_column, "data.label_column")):
        if column not in frame.columns:
            raise DataError(f"{origin}: no column '{column}' ({key}); columns: "
                            f"{', '.join(map(str, frame.columns))}")
    return frame, text


def _checked_values(frame: pd.DataFrame, column: str, origin: str) -> pa.Array:
    """The chunk's texts (or token-id lists) as Arrow, every row checked."""
    values = frame[column].tolist()
    if column != PRETOKENIZED_COLUMN:
        for row, text in zip(frame.index, values, strict=True):
            if not isinstance(text, str):
                raise DataError(f"{origin}: row {row + 1}, column '{column}': expected text, got {text!r}")
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


def _read_hub(name: str, split: str, label_column: str):
    import datasets  # seconds to import, and only hub sources need it

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub client raises many types; all mean "cannot get it"
        raise DataError(f"{name}: cannot load split '{split}' from the hub "
                        f"({e.__class__.__name__}: {' '.join(str(e).split())[:200]})") from None
    feature = ds.features.get(label_column)  # a ClassLabel names the classes; another column's does not
    names = list(feature.names) if hasattr(feature, "names") else None
    # the dataset is memory-mapped Arrow: it reaches pandas a chunk at a time
    frames = ds.to_pandas(batch_size=CHUNK_ROWS, batched=True) if len(ds) else iter([ds.to_pandas()])
    return frames, f"{name}[{split}]", names


def _read_local(path: Path, split: str, cfg: DataConfig):
    if not exists(path):
        raise DataError(f"{path}: data.source does not exist")
    if path.is_file():
        if split != cfg.train_split:
            raise DataError(f"{path}: a single file holds only the train split; set "
                            f"data.eval_split=null and data.holdout_size=N to evaluate on held-out rows")
        return table_chunks(path, cfg.encoding), str(path), None
    for suffix in TABLE_SUFFIXES:
        candidate = path / f"{split}{suffix}"
        if candidate.exists():
            return table_chunks(candidate, cfg.encoding), str(candidate), None
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


def check_encoding(path: Path, encoding: str) -> None:
    """Stop at the first bytes that are not valid `encoding`, naming their line, reading in blocks."""
    try:
        decoder = codecs.getincrementaldecoder(encoding)()
    except LookupError:
        raise DataError(f"{path}: unknown data.encoding '{encoding}'") from None
    line = 1
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 24)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                line += block.count(b"\n", 0, max(e.start, 0))
                raise DataError(f"{path}: line {line}: text is not valid {encoding} "
                                f"(set data.encoding, e.g. latin-1)") from None
            if not block:
                return
            line += block.count(b"\n")


def table_chunks(path: Path, encoding: str) -> Iterator[pd.DataFrame]:
    """A table file as frames of CHUNK_ROWS rows, parsed exactly as the whole file would be."""
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use {', '.join(TABLE_SUFFIXES)})")
    if suffix != ".parquet":
        check_encoding(path, encoding)
    return _parse_errors_named(path, _table_chunks(path, suffix, encoding))


def _table_chunks(path: Path, suffix: str, encoding: str) -> Iterator[pd.DataFrame]:
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        file = pq.ParquetFile(path)
        empty = True
        for batch in file.iter_batches(batch_size=CHUNK_ROWS):
            empty = False
            yield batch.to_pandas()
        if empty:
            yield file.schema_arrow.empty_table().to_pandas()
    elif suffix == ".tsv":  # TSV cells are not quoted (SST-2 sentences hold bare quotes)
        yield from pd.read_csv(path, sep="\t", quoting=3, dtype=object, encoding=encoding, chunksize=CHUNK_ROWS)
    elif suffix == ".csv":
        yield from pd.read_csv(path, dtype=object, encoding=encoding, chunksize=CHUNK_ROWS)
    else:
        yield from pd.read_json(path, lines=True, dtype=False, encoding=encoding, chunksize=CHUNK_ROWS)


def _parse_errors_named(path: Path, frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    try:
        yield from frames
    except DataError:
        raise
    except Exception as e:  # pandas/pyarrow parse errors come in many types
        raise DataError(f"{path}: cannot parse ({e.__class__.__name__}: {' '.join(str(e).split())[:200]})") from None


def read_table(path: Path, encoding: str) -> pd.DataFrame:
    """A small table whole (engine/compare's input files)."""
    frames = list(table_chunks(path, encoding))
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)


def _read_aclimdb(folder: Path, encoding: str) -> Iterator[pd.DataFrame]:
    files = [(label, file) for label, sub in enumerate(("neg", "pos")) for file in sorted((folder / sub).glob("*.txt"))]
    for start in range(0, max(len(files), 1), CHUNK_ROWS):
        part = files[start:start + CHUNK_ROWS]
        yield pd.DataFrame({"text": [decode_file(f, encoding) for _, f in part],
                            "label": [label for label, _ in part]})


def _read_text_label_pair(path: Path, split: str, cfg: DataConfig):
    # one tweet a line: these files are small (TweetEval's largest, 12,284 lines), read whole
    text_file, label_file = path / f"{split}_text.txt", path / f"{split}_labels.txt"
    texts = decode_file(text_file, cfg.encoding).splitlines()
    if not label_file.exists():
        raise DataError(f"{label_file}: missing (it pairs with {text_file.name})")
    labels = decode_file(label_file, cfg.encoding).splitlines()
    if len(texts) != len(labels):
        raise DataError(f"{label_file}: {len(labels)} labels for {len(texts)} lines of {text_file.name}")
    mapping = path / "mapping.txt"
    names = _read_mapping(mapping, cfg.encoding) if mapping.exists() else None
    frame = pd.DataFrame({cfg.text_column: texts, cfg.label_column: labels})
    return iter([frame]), str(text_file), names


def _read_mapping(mapping: Path, encoding: str) -> list[str]:
    """TweetEval's mapping.txt: `<id>\t<name>` a line, ids 0..K-1 in any order -> names by id."""
    by_id = {}
    for line_no, line in enumerate(decode_file(mapping, encoding).splitlines(), 1):
        if not line.strip():
            continue
        number, sep, name = line.strip().partition("\t")
        if not sep or not number.strip().isdigit() or not name.strip():
            raise DataError(f"{mapping}: line {line_no}: expected '<class id><tab><name>', got {line.strip()[:80]!r}")
        if int(number) in by_id:
            raise DataError(f"{mapping}: line {line_no}: class id {int(number)} named twice")
        by_id[int(number)] = name.strip()
    if sorted(by_id) != list(range(len(by_id))) or len(by_id) < 2:
        raise DataError(f"{mapping}: class ids must be 0..K-1 for K >= 2 classes, got {sorted(by_id)}")
    return [by_id[i] for i in range(len(by_id))]


# --------------------------------------------------------------------------------------------
# Labels and subsets


def label_ids(raw: RawSplit, cfg: DataConfig, names: list[str] | None,
              model_names: Callable[[], list[str] | None] | None = None, also: list = ()):
    """Map stored labels to class ids; returns (class names, ids).

    Class names, first found: `names` (the train split's, when mapping eval), data.label_names,
    the names the source declares (hub ClassLabel, mapping.txt, aclImdb's neg/pos), else for
    integer labels those of `_integer_class_names` (`also`: the other splits' labels, which decide
    with this split's whether they count from 0 or from 1). Integer labels map by position, or by
    name when every class name is a number ("1".."K": see `_integer_class_names`).
    """
    values, rows, column = raw.labels, raw.rows, raw.column
    for v, row in zip(values, rows, strict=True):
        if v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip()):
            raise DataError(f"{raw.origin}: row {row}, column '{column}': missing label")
    names = names or cfg.label_names or raw.label_names
    as_int = [_as_int(v) for v in values]
    if all(v is not None for v in as_int):
        if names is None:
            names = _integer_class_names(as_int, [i for i in map(_as_int, also) if i is not None], model_names)
        if numbered(names):  # classes named by their stored value ("1".."K"): map by name
            by_value = {int(n): i for i, n in enumerate(names)}
            for v, row in zip(as_int, rows, strict=True):
                if v not in by_value:
                    raise DataError(f"{raw.origin}: row {row}, column '{column}': label {v} is not one of "
                                    f"the classes {', '.join(names)}")
            return list(names), np.asarray([by_value[v] for v in as_int], dtype=np.int64)
        for v, row in zip(as_int, rows, strict=True):
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
    for v, row in zip(strings, rows, strict=True):
        if v.lower() not in index:
            raise DataError(f"{raw.origin}: row {row}, column '{column}': unknown label {v!r} "
                            f"(known: {', '.join(names)})")
        ids.append(index[v.lower()])
    return list(names), np.asarray(ids, dtype=np.int64)


def _integer_class_names(values: list[int], others: list[int], model_names) -> list[str]:
    """Classes for integer labels that nobody names: as many as the train split's largest label says.

    0..K-1, as in every hub dataset and in what transformers' heads expect: the ids as stored, named
    as the model's config names K classes, else LABEL_i. No 0 in train nor in the `others` splits
    (Yelp and Amazon polarity CSVs store 1/2, star ratings 1..5): the labels count from one, and K
    classes named "1".."K" take ids 0..K-1, so no class that never occurs is added to the head and
    to macro-F1. Another split's label past train's classes stays an error (a typo, or a class
    the model would never learn).
    """
    if min(values + others) >= 1:
        return [str(v) for v in range(1, max(max(values), 2) + 1)]
    n_classes = max(max(values) + 1, 2)
    named = model_names() if model_names else None
    return list(named) if named and len(named) == n_classes else [f"LABEL_{i}" for i in range(n_classes)]


def numbered(names: list[str]) -> bool:
    """Class names that are the integer labels they stand for ("1".."5"): labels map to them by name."""
    return all(str(n).strip().lstrip("-").isdigit() for n in names)


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
    texts = ex.texts.take(idx) if isinstance(ex.texts, Column) else [ex.texts[i] for i in idx]
    return Examples(texts, ex.labels[idx], ex.origin, None if ex.rows is None else ex.rows[idx], ex.pretokenized)

"""Files and hub datasets -> pandas frames, a chunk at a time, each kind of source read as it is laid out.

Sources, by what `data.source` names:
  - a hub dataset name (`imdb`), read with `datasets.load_dataset`;
  - a folder holding `<split>.parquet|csv|tsv|jsonl`, or the aclImdb layout `<split>/pos/*.txt`,
    or `<split>_text.txt` + `<split>_labels.txt` (TweetEval);
  - a single file (it is the train split; carve an eval set with `data.holdout_size`).
CSV / TSV / JSONL go through pandas' chunked readers, parquet through pyarrow's record batches, hub
datasets from their memory-mapped Arrow: what is resident while reading is one chunk, not the file.
A CSV or TSV cell is text as written: only an empty cell is missing (pandas would also take `NA`,
`null`, `None`, `nan`, `N/A`, ... for missing, and a review or a label can be those words).
"""
from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from engine.config import DataConfig
from engine.errors import DataError, MissingPackageError
from engine.paths import exists, is_local, resolve

TABLE_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl")
# a source is parsed CHUNK_ROWS rows at a time (about 25 MB of reviews)
CHUNK_ROWS = 20_000
TEXT_CELLS = {"dtype": object, "keep_default_na": False, "na_values": [""]}


def open_split(cfg: DataConfig, split: str) -> tuple[Iterator[pd.DataFrame], str, list[str] | None]:
    """(the split's frames, where they come from, the class names the source declares or None)."""
    if is_local(cfg.source):
        try:
            path = Path(resolve(cfg.source)).expanduser()
        except MissingPackageError as e:
            raise DataError(str(e)) from None
        return _read_local(path, split, cfg)
    # the label column's name on the hub, before data.rename_columns
    label = next((old for old, new in cfg.rename_columns.items() if new == cfg.label_column), cfg.label_column)
    return _read_hub(cfg.source, split, label)


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
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
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
        yield from pd.read_csv(path, sep="\t", quoting=3, encoding=encoding, chunksize=CHUNK_ROWS, **TEXT_CELLS)
    elif suffix == ".csv":
        yield from pd.read_csv(path, encoding=encoding, chunksize=CHUNK_ROWS, **TEXT_CELLS)
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
    if not frames or not len(frames[0].columns):  # JSON lines that are all blank
        raise DataError(f"{path}: no rows")
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

"""Label a file of new texts with a classifier: read -> tokenize -> engine.evaluation.predict -> write,
one chunk of rows at a time.

The scoring is evaluate's own (`evaluation.predict`: length-sorted batches, sharded over ranks and
gathered back into input order) on the classifier evaluate loads (engine/classifiers.py), cut and
scored as its run was (engine/run_settings.py) unless a flag says otherwise. The input is read and
the output written `readers.CHUNK_ROWS` rows at a time, so memory holds one chunk whatever the
file's size, and the output is a temporary file renamed into place once complete.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from engine import batching, classifiers, distributed, modeling, readers, run_settings, sources
from engine import precision as precision_lib
from engine.config import DistributedConfig
from engine.errors import DataError, OutputDirError
from engine.evaluation import predict, token_folder
from engine.metrics import softmax
from engine.precision import Precision

INPUT_SUFFIXES = (".txt", *sources.TABLE_SUFFIXES)
OUTPUT_SUFFIXES = (".csv", ".jsonl")


def check_output(path: str | Path, overwrite: bool) -> Path:
    """Refuse before any work: an output type we cannot write, or a file a user may still need."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise DataError(f"{path}: the output must end in {' or '.join(OUTPUT_SUFFIXES)}")
    if path.exists() and not overwrite:
        raise OutputDirError(f"{path}: already exists; pass --overwrite to replace it")
    return path


class InputFile:
    """The texts of a file in file order, a chunk at a time, with the input columns kept beside them.

    A .txt holds one text per line, split on "\\n" only (a "\\r" before it dropped): str.splitlines
    would also split on form feeds, \\x1c-\\x1e, \\x85, \\u2028 and \\u2029, which real reviews
    hold, and every later row would be another text's. A table holds them in `column`."""

    def __init__(self, path: str | Path, column: str = "text", keep: tuple[str, ...] = (), encoding: str = "utf-8"):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such file")
        self.suffix = self.path.suffix.lower()
        if self.suffix not in INPUT_SUFFIXES:
            raise DataError(f"{self.path}: unsupported file type '{self.suffix}' (use {', '.join(INPUT_SUFFIXES)})")
        self.keep = tuple(dict.fromkeys(keep))
        if self.keep and self.suffix == ".txt":
            raise DataError(f"{self.path}: --keep-columns needs a table (.csv, .tsv, .jsonl, .parquet); "
                            f"a .txt has no columns")
        self.column = "text" if self.suffix == ".txt" else column
        self.encoding = encoding

    def check(self) -> int:
        """Read the whole file once, checking every row, so that bad input stops before any work;
        the number of texts."""
        n = sum(len(texts) for texts, _ in self.chunks())
        if not n:
            raise DataError(f"{self.path}: no texts")
        return n

    def chunks(self) -> Iterator[tuple[list[str], pd.DataFrame | None]]:
        """(texts, the kept columns or None), at most readers.CHUNK_ROWS rows at a time."""
        row = 0
        for frame in self._frames():
            missing = [c for c in (self.column, *self.keep) if c not in frame.columns]
            if missing:
                flag = "--text-column" if missing[0] == self.column else "--keep-columns"
                raise DataError(f"{self.path}: no column '{missing[0]}' ({flag}); columns: "
                                f"{', '.join(map(str, frame.columns))}")
            texts = frame[self.column].tolist()
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise DataError(f"{self.path}: row {row + i + 1}, column '{self.column}': expected text, "
                                    f"got {text!r}")
            row += len(texts)
            yield texts, frame[list(self.keep)].reset_index(drop=True) if self.keep else None

    def _frames(self) -> Iterator[pd.DataFrame]:
        if self.suffix != ".txt":
            yield from readers.table_chunks(self.path, self.encoding)
            return
        readers.check_encoding(self.path, self.encoding)  # names the line of a bad byte
        # newline="\n": the file object ends lines at "\n" alone, and translates nothing
        with open(self.path, encoding=self.encoding, newline="\n") as fh:
            while lines := list(itertools.islice(fh, readers.CHUNK_ROWS)):
                yield pd.DataFrame({self.column: [line.removesuffix("\n").removesuffix("\r") for line in lines]})


def own_columns(path: Path, names: list[str]) -> list[str]:
    """The columns (CSV) or keys (JSONL) predict writes beside the kept ones."""
    return ["label", "probability", *([f"prob_{n}" for n in names] if path.suffix.lower() == ".csv" else ["probs"])]


class OutputFile:
    """Rows appended a chunk at a time to a temporary file beside `path`, renamed into place by
    `commit`: a reader never sees half a file, and a failed run leaves none.

    CSV: the kept columns, label, probability, prob_<class>...; JSONL: {kept..., label, probability, probs}."""

    def __init__(self, path: Path, names: list[str]):
        self.path, self.names, self.first = path, names, True
        self.csv = path.suffix.lower() == ".csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        self.fh = os.fdopen(fd, "w", encoding="utf-8", newline="")

    def write(self, probs: np.ndarray, kept: pd.DataFrame | None) -> None:
        best = probs.argmax(axis=-1)  # as classification_metrics takes it: the same labels evaluate scores
        label = [self.names[i] for i in best]
        top = probs[np.arange(len(probs)), best]
        if self.csv:
            frame = pd.DataFrame({"label": label, "probability": top,
                                  **{f"prob_{n}": probs[:, i] for i, n in enumerate(self.names)}})
            if kept is not None:
                frame = pd.concat([kept, frame], axis=1)
            frame.to_csv(self.fh, index=False, header=self.first)
        else:
            rows = kept.astype(object).where(kept.notna(), None).to_dict("records") if kept is not None \
                else [{}] * len(probs)
            for row, values in enumerate(rows):
                self.fh.write(json.dumps({**values, "label": label[row], "probability": float(top[row]),
                                          "probs": {n: float(probs[row, i]) for i, n in enumerate(self.names)}},
                                         default=str) + "\n")
        self.first = False

    def commit(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.fh.close()
        Path(self.tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def output_file(path: Path, names: list[str], main: bool):
    """The output on the main rank (None elsewhere), committed when the block ends without error."""
    if not main:
        yield None
        return
    out = OutputFile(path, names)
    try:
        yield out
    except BaseException:
        out.discard()
        raise
    out.commit()


def label_file(model_spec: str, input_path: str, output_path: str, *, base: str | None = None,
               text_column: str = "text", keep_columns: tuple[str, ...] = (), encoding: str = "utf-8",
               max_length: int | None = None, truncation: str | None = None, head_tokens: int | None = None,
               batch_size: int | None = None, precision: str | None = None, overwrite: bool = False,
               trust_remote_code: bool = False, num_threads: int | None = None) -> dict:
    """Write one row per input text, in input order. The cut, batch size and precision: each flag
    given (not None), else the model's run settings, else run_settings.DEFAULTS (precision auto).
    Every input is checked before anything is printed. Under torchrun each rank scores its share of
    each chunk and rank 0 writes. Returns a summary (every rank)."""
    out = check_output(output_path, overwrite)
    source = InputFile(input_path, text_column, keep_columns, encoding)
    n = source.check()
    loaded = classifiers.load(model_spec, base, trust_remote_code)
    asked = {"max_length": max_length, "truncation": truncation, "head_tokens": head_tokens,
             "batch_size": batch_size, "precision": precision}
    reading, notes = run_settings.reading(loaded.settings, asked, "auto", modeling.max_positions(loaded.model))
    modeling.check_max_length(loaded.model, reading.max_length, model_spec, key="--max-length")
    names = loaded.label_names
    clash = next((c for c in source.keep if c in own_columns(out, names)), None)
    if clash:
        raise DataError(f"--keep-columns: '{clash}' is a column predict writes itself; rename it in {input_path}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = distributed.init(DistributedConfig(strategy="ddp" if world > 1 else "none"), num_threads)
    try:
        say = run_settings.say if dist.is_main else (lambda text: None)
        for note in notes:
            say(note)
        choice = precision_lib.choose(reading.precision, dist.device, dist.broadcast_object, say, dist.is_main,
                                      key="--precision")
        model, tokenizer = loaded.model.to(dist.device), loaded.tokenizer
        run = Precision(choice.name, dist.device)
        with output_file(out, names, dist.is_main) as sink:
            for texts, kept in source.chunks():
                probs = probabilities(model, tokenizer, texts, reading, run, dist)
                if sink is not None:
                    sink.write(probs, kept)
        dist.barrier()
    finally:
        dist.close()
    return {"model": model_spec, **({"base": loaded.base} if loaded.base else {}), "input": str(input_path),
            "output": str(out), "n": n, "labels": names, "precision": choice.name, "processes": dist.world,
            "read_as": {**reading.as_dict(), "precision": choice.name},
            "settings": str(loaded.settings.file) if loaded.settings else None, "overrides": notes}


def probabilities(model, tokenizer, texts: list[str], reading: run_settings.Reading, precision: Precision,
                  dist) -> np.ndarray:
    """Every class's probability for each text, in order (every rank), through a token store that
    lives only as long as this chunk's scoring."""
    examples = sources.Examples(texts, np.zeros(len(texts), dtype=np.int64), "input")
    with token_folder() as folder:
        tokens = batching.tokenize(examples, tokenizer, reading.max_length, folder, truncation=reading.truncation,
                                   head_tokens=reading.head_tokens)
        logits = predict(model, tokens, reading.batch_size, precision, dist, tokenizer.pad_token_id,
                         tokenizer.padding_side == "left")
    return softmax(logits.astype(np.float64))

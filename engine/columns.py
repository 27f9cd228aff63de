"""A split's texts (or token-id lists) kept on disk, in an Arrow file read back a record batch at a
time: memory holds the labels and row numbers of a million reviews, not their text.

The file never has a name (O_TMPFILE where the file system has it, else created and unlinked at
once, under a random name): nothing outlives the process, killed or not, so no process ever cleans
up after another, and a cache folder shared between hosts or containers is safe. It lives in
data.cache_dir when a recipe names one, else in the user cache.

Why not `datasets`' own Arrow cache: its files are named after the data and stay on disk after the
run (every source variant's texts, until someone deletes them, and a shared cache's cleanup removes
other runs' files); it reads them back through a memory map, whose pages count toward the process's
resident memory as tokenization walks the texts; and it costs seconds to import for a local file.
"""
from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from engine import paths
from engine.errors import DataError

BATCH_ROWS = 2_048  # rows per record batch on disk: what one read brings into memory


def scratch_dir(cache_dir: str | None) -> Path:
    """Where a split's column file goes: data.cache_dir, else the user cache."""
    return Path(cache_dir).expanduser() if cache_dir else paths.user_cache_dir()


class ColumnFile:
    """One column of a split, written a chunk at a time, then read back a record batch at a time
    through plain reads (no memory map: the text read stays out of the process's resident memory)."""

    def __init__(self, folder: Path):
        self.folder = folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._file = tempfile.TemporaryFile(dir=folder, suffix=".arrow")
        except OSError as e:
            raise _unwritable(folder, e) from None
        self._sink = None
        self._reader = None
        self._starts = [0]
        self._cached: tuple[int, pa.Array] | None = None

    def append(self, values: pa.Array) -> None:
        try:
            for start in range(0, len(values), BATCH_ROWS):
                batch = pa.record_batch([values.slice(start, BATCH_ROWS)], names=["v"])
                if self._sink is None:
                    self._sink = pa.ipc.new_file(pa.PythonFile(self._file, mode="w"), batch.schema)
                self._sink.write_batch(batch)
                self._starts.append(self._starts[-1] + len(batch))
        except OSError as e:  # a full disk, mostly
            raise _unwritable(self.folder, e) from None

    def close(self) -> None:
        """Done writing: from now on the column is read."""
        if self._sink is not None:
            self._sink.close()
            self._file.flush()
            self._reader = pa.ipc.open_file(pa.PythonFile(self._file, mode="r"))
        else:
            self._file.close()
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


def _unwritable(folder: Path, e: OSError) -> DataError:
    return DataError(f"{folder}: cannot write the split's texts there ({e.strerror or e}); "
                     f"set data.cache_dir to a writable folder")


class Column(Sequence):
    """A split's texts (or token-id lists) kept on disk: `index` picks and orders the rows, so a
    subset is an index array, and a million reviews cost their index in memory, not their text."""

    def __init__(self, file: ColumnFile, index: np.ndarray | None = None):
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

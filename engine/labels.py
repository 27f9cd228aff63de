"""Stored labels -> class names and class ids: one rule for every source and split.

Class names, first found: the train split's (when mapping another split), data.label_names, the
names the source declares (hub ClassLabel, mapping.txt, aclImdb's neg/pos), else for integer labels
`integer_class_names`, for text labels `text_class_names`.
A text label reaches its class by `fold`: case and surrounding spaces do not count, so `Positive`
and `positive` are one class, and no class is made that no label reaches (a class no label reaches
would sit in the head and in macro-F1, and a pretrained head of the right size would not fit).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from engine.config import DataConfig
from engine.errors import DataError

if TYPE_CHECKING:
    from engine.sources import RawSplit


def fold(name) -> str:
    """What a text label and a class name are compared by (data.label_names are checked the same way)."""
    return str(name).strip().lower()


def label_ids(raw: RawSplit, cfg: DataConfig, names: list[str] | None,
              model_names: Callable[[], list[str] | None] | None = None, also: list = ()):
    """Map stored labels to class ids; returns (class names, ids).

    `names`: the train split's, when mapping another split. `also`: the other splits' labels, which
    decide with this split's whether integer labels count from 0 or from 1. Integer labels map by
    position, or by name when every class name is a number ("1".."K": see `integer_class_names`).
    """
    values, rows, column = raw.labels, raw.rows, raw.column
    for v, row in zip(values, rows, strict=True):
        if v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip()):
            raise DataError(f"{raw.origin}: row {row}, column '{column}': missing label")
    names = names or cfg.label_names or raw.label_names
    as_int = [_as_int(v) for v in values]
    if all(v is not None for v in as_int):
        if names is None:
            names = integer_class_names(as_int, [i for i in map(_as_int, also) if i is not None], model_names)
        return list(names), _integer_ids(raw, as_int, names)
    strings = [str(v).strip() for v in values]
    if names is None:
        names = text_class_names(strings, raw.origin, column)
    index = _index(names, raw.origin)
    ids = []
    for v, row in zip(strings, rows, strict=True):
        if fold(v) not in index:
            raise DataError(f"{raw.origin}: row {row}, column '{column}': unknown label {v!r} "
                            f"(known: {', '.join(names)})")
        ids.append(index[fold(v)])
    return list(names), np.asarray(ids, dtype=np.int64)


def text_class_names(labels: list[str], origin: str, column: str) -> list[str]:
    """One class per label as `fold` sees it, named by its spelling that sorts first, in sorted
    order: the distinct labels sorted, where no two differ in case only."""
    spelling = {}
    for label in sorted(set(labels)):
        spelling.setdefault(fold(label), label)
    names = sorted(spelling.values())
    if len(names) < 2:
        raise DataError(f"{origin}: column '{column}' holds one class only ({names[0]!r}); "
                        f"list the classes in data.label_names")
    return names


def _index(names: list[str], origin: str) -> dict[str, int]:
    """fold(name) -> class id; two names that fold alike could not both be reached."""
    index = {}
    for i, name in enumerate(names):
        if fold(name) in index:
            raise DataError(f"{origin}: class names {names[index[fold(name)]]!r} and {name!r} differ only "
                            f"in case or spaces, so no label can tell them apart")
        index[fold(name)] = i
    return index


def _integer_ids(raw: RawSplit, as_int: list[int], names: list[str]) -> np.ndarray:
    if numbered(names):  # classes named by their stored value ("1".."K"): map by name
        by_value = {int(n): i for i, n in enumerate(names)}
        for v, row in zip(as_int, raw.rows, strict=True):
            if v not in by_value:
                raise DataError(f"{raw.origin}: row {row}, column '{raw.column}': label {v} is not one of "
                                f"the classes {', '.join(names)}")
        return np.asarray([by_value[v] for v in as_int], dtype=np.int64)
    for v, row in zip(as_int, raw.rows, strict=True):
        if not 0 <= v < len(names):
            raise DataError(f"{raw.origin}: row {row}, column '{raw.column}': label {v} out of range "
                            f"0..{len(names) - 1} ({', '.join(names)})")
    return np.asarray(as_int, dtype=np.int64)


def integer_class_names(values: list[int], others: list[int], model_names) -> list[str]:
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

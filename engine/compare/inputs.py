"""What the models are scored on: phrases (from the recipe or a file) and labelled dataset splits."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine import paths, readers, sources
from engine.compare.polarity import POLARITIES, map_labels
from engine.compare.recipe import CompareData, CompareRecipe, Phrase
from engine.config import DataConfig
from engine.errors import DataError, RecipeError
from engine.labels import label_ids
from engine.sources import Examples


def load_phrases(recipe: CompareRecipe) -> list[Phrase]:
    if not recipe.phrases_file:
        return list(recipe.phrases)
    path = Path(recipe.phrases_file)
    if not paths.exists(path):
        raise DataError(f"{path}: phrases_file does not exist")
    if path.suffix.lower() == ".txt":
        lines = readers.decode_file(path, "utf-8").splitlines()
        return [Phrase(line.strip()) for line in lines if line.strip()]
    if path.suffix.lower() not in readers.TABLE_SUFFIXES:
        raise DataError(f"{path}: phrases_file must be .txt (one phrase a line) or "
                        f"{'/'.join(readers.TABLE_SUFFIXES)} with columns text, expected")
    frame = readers.read_table(path, "utf-8")
    if "text" not in frame.columns:
        raise DataError(f"{path}: no column 'text'; columns: {', '.join(map(str, frame.columns))}")
    out = []
    for row, rec in enumerate(frame.to_dict("records"), start=2):
        text, expected = rec.get("text"), rec.get("expected")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: row {row}, column 'text': expected text, got {text!r}")
        if expected is None or (isinstance(expected, float) and math.isnan(expected)) or expected == "":
            expected = None
        elif str(expected).strip().lower() not in POLARITIES:
            raise DataError(f"{path}: row {row}, column 'expected': {expected!r} is not one of "
                            f"{', '.join(POLARITIES)} (or empty)")
        else:
            expected = str(expected).strip().lower()
        out.append(Phrase(text, expected))
    if not out:
        raise DataError(f"{path}: no phrases")
    return out


@dataclass
class EvalSet:
    name: str
    cfg: CompareData
    test: Examples
    val: Examples | None
    label_names: list[str]
    gold_polarity: np.ndarray  # per label id
    polarities: set

    def gold(self, ex: Examples) -> np.ndarray:
        return self.gold_polarity[ex.labels]


def _labelled(cfg: DataConfig, split: str, names: list[str] | None):
    raw = sources.read_split(cfg, split)
    names, ids = label_ids(raw, cfg, names)
    return names, Examples(raw.texts, ids, raw.origin)


def load_eval_set(cfg: CompareData, seed: int) -> EvalSet:
    name = cfg.name or Path(cfg.source).name
    if cfg.eval_split:
        names, pool = _labelled(cfg, cfg.eval_split, None)
    else:
        # exactly the rows a training run with this seed held out: none of them was trained on
        splits = sources.load_splits(dataclasses.replace(cfg, eval_size=None, train_size=None), seed)
        names, pool = splits.label_names, splits.eval
    val = None
    if cfg.val_split:
        _, val = _labelled(cfg, cfg.val_split, names)
        if cfg.val_size and cfg.val_size < len(val.texts):
            val = sources.take(val, sources.stratified_subset(val.labels, cfg.val_size, seed + 2))
        elif not cfg.val_size:
            val = None
    elif cfg.val_size:
        if cfg.val_size >= len(pool.texts):
            raise DataError(f"{pool.origin}: val_size={cfg.val_size} leaves nothing to score "
                            f"(split has {len(pool.texts)}); lower it or set val_split")
        held = sources.stratified_subset(pool.labels, cfg.val_size, seed + 2)
        rest = np.setdiff1d(np.arange(len(pool.texts)), held)
        val, pool = sources.take(pool, held), sources.take(pool, rest)
        val.origin += f" (temperature split: {cfg.val_size}, seed {seed + 2})"
    if cfg.eval_size is not None and cfg.eval_size < len(pool.texts):
        pool = sources.take(pool, sources.stratified_subset(pool.labels, cfg.eval_size, seed + 1))
    try:
        lm = map_labels(names, who=f"dataset '{name}'")
    except RecipeError:
        raise RecipeError(f"dataset '{name}': its labels {names} do not name polarities; set label_names "
                          f"in its entry, e.g. label_names: [negative, positive]") from None
    gold = np.asarray(lm.polarity, dtype=np.int64)
    return EvalSet(name, cfg, pool, val, names, gold, set(lm.polarity))

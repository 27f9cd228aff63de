"""The compare recipe: which models, phrases and datasets, and how to score them.

Loaded with engine.recipe_yaml.load_recipe(path, overrides, schema=CompareRecipe).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.compare.polarity import POLARITIES
from engine.config import DataConfig
from engine.errors import RecipeError
from engine.paths import uncreatable

VADER = "vader"  # the VADER lexicon, named in `models` like a model
SEED_MODELS = ["finiteautomata/bertweet-base-sentiment-analysis", "ProsusAI/finbert",
               "nlptown/bert-base-multilingual-uncased-sentiment", VADER]


@dataclass
class Phrase:
    text: str = ""
    expected: Literal["negative", "neutral", "positive"] | None = None  # neutral: ambiguous

    def check(self, where: str) -> None:
        if not self.text.strip():
            raise RecipeError(f"{where}: a phrase needs a non-empty 'text'")


SEED_PHRASES = [
    Phrase("I love you", "positive"),
    Phrase("I hate you", "negative"),
    Phrase("the product would be great, had it not broke a minute after I purchased it", "neutral"),
]


@dataclass
class CompareData(DataConfig):
    """An engine `data` section, plus the two choices a comparison adds.

    Scored examples: `eval_split` (a seeded, stratified `eval_size` subset), or, with
    eval_split=null and holdout_size=N, the rows a training run with the same seed held out.
    The temperature is fitted on `val_split`, or on `val_size` examples carved out of the scored
    split before scoring (disjoint from them).
    """
    name: str | None = None  # shown in tables and file names (default: the source's folder name)
    val_split: str | None = None
    val_size: int = 200  # 0: no temperature scaling

    def check(self, where: str) -> None:
        super().check(where)
        label = self.name or self.source
        if self.holdout_size and self.eval_split:
            raise RecipeError(f"{where}: dataset '{label}': holdout_size scores the rows held out of "
                              f"train_split; set eval_split: null to use it")
        if not self.holdout_size and not self.eval_split:
            raise RecipeError(f"{where}: dataset '{label}': set eval_split, or eval_split: null with holdout_size")
        for key in ("val_size", "holdout_size"):
            if getattr(self, key) < 0:
                raise RecipeError(f"{where}: dataset '{label}': '{key}' must be >= 0")
        if self.eval_size is not None and self.eval_size < 1:
            raise RecipeError(f"{where}: dataset '{label}': 'eval_size' must be >= 1")
        if self.max_length < 1:
            raise RecipeError(f"{where}: dataset '{label}': 'max_length' must be >= 1")


@dataclass
class CompareRecipe:
    output_dir: str = "runs/compare"
    seed: int = 42  # subsets; keep the training recipes' seed so holdout datasets are their held-out rows
    models: list[str] = field(default_factory=lambda: list(SEED_MODELS))  # hub name, folder, package://, vader
    # per model (as written in `models`, or "*" for all): {label: negative|neutral|positive}
    label_maps: dict[str, Any] = field(default_factory=dict)
    phrases: list[Phrase] = field(default_factory=lambda: [dataclasses.replace(p) for p in SEED_PHRASES])
    phrases_file: str | None = None  # csv/tsv/jsonl with `text` (+ optional `expected`), or .txt lines
    datasets: list[CompareData] = field(default_factory=list)
    abstain_threshold: float = 0.6  # abstain when the winning polarity's probability is below this
    calibration_bins: int = 10
    batch_size: int = 32
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_threads: int | None = None  # torch threads (default: torch's choice)
    trust_remote_code: bool = False

    def check(self, where: str) -> None:
        why = uncreatable(self.output_dir)
        if why:
            raise RecipeError(f"{where}: 'output_dir' cannot be created ({why})")
        if not self.models:
            raise RecipeError(f"{where}: 'models' is empty; list hub names, folders or vader")
        if len(set(self.models)) != len(self.models):
            raise RecipeError(f"{where}: 'models' lists a model twice: {self.models}")
        if not 0 <= self.abstain_threshold <= 1:
            raise RecipeError(f"{where}: 'abstain_threshold' must be in [0, 1], got {self.abstain_threshold}")
        for key in ("calibration_bins", "batch_size"):
            if getattr(self, key) < 1:
                raise RecipeError(f"{where}: '{key}' must be >= 1, got {getattr(self, key)}")
        # entries for models not listed are allowed: `models=[...]` overrides keep the recipe's maps
        for model, mapping in self.label_maps.items():
            if not isinstance(mapping, dict):
                raise RecipeError(f"{where}: label_maps['{model}'] must map label -> polarity, got {mapping!r}")
            for label, polarity in mapping.items():
                if polarity not in POLARITIES:
                    raise RecipeError(f"{where}: label_maps['{model}']['{label}'] must be one of "
                                      f"{', '.join(POLARITIES)}; got {polarity!r}")
        names = [d.name or Path(d.source).name for d in self.datasets]
        if len(set(names)) != len(names):
            raise RecipeError(f"{where}: two datasets share the name {names}; give each a 'name'")

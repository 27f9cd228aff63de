"""Compare pre-trained sentiment classifiers on phrases and datasets, on one polarity scale.

Models with 2, 3 or 5 labels (or the VADER lexicon) are made comparable by mapping every label onto
negative / neutral / positive and summing probabilities per polarity. Per phrase: the full
distribution, top label, polarity, margin, entropy and an abstain verdict. Per dataset: accuracy,
macro-F1, confusion, calibration (ECE, Brier, reliability diagram) before and after temperature
scaling, and accuracy per length bucket. Scoring runs through engine.evaluation.predict, the same
code that evaluates a fine-tuning run.

    python launch/compare.py --recipe recipes/compare_pretrained.yaml [key=value ...]
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from engine import data as data_lib
from engine.config import DataConfig, ModelConfig, RecipeError, dump_recipe, to_dict
from engine.data import DataError, Examples
from engine.metrics import (brier_score, classification_metrics, expected_calibration_error,
                            reliability_bins, softmax)
from engine.modeling import ModelError

POLARITIES = ("negative", "neutral", "positive")
NEG, NEU, POS = 0, 1, 2
VADER = "vader"
# VADER's authors call a compound score >= 0.05 positive, <= -0.05 negative, neutral in between.
# Logits scale * (-c, 0.05, c) keep exactly that decision under softmax; the scale only sets how
# confident the probabilities look, which temperature scaling then re-fits like for any model.
VADER_THRESHOLD = 0.05
VADER_SCALE = 4.0
LENGTH_EDGES = (0, 10, 20, 40, 80, 160, 320)  # words; the last bucket is open-ended
T_RANGE = (0.05, 20.0)  # temperatures searched; a chance-level model runs into the upper end

SEED_MODELS = ["finiteautomata/bertweet-base-sentiment-analysis", "ProsusAI/finbert",
               "nlptown/bert-base-multilingual-uncased-sentiment", VADER]


# --------------------------------------------------------------------------------------------
# Recipe schema (loaded with engine.config.load_recipe(path, overrides, schema=CompareRecipe))


@dataclass
class Phrase:
    text: str = ""
    expected: Optional[Literal["negative", "neutral", "positive"]] = None  # neutral: ambiguous

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
    name: Optional[str] = None  # shown in tables and file names (default: the source's folder name)
    val_split: Optional[str] = None
    val_size: int = 200  # 0: no temperature scaling

    def check(self, where: str) -> None:
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
    phrases_file: Optional[str] = None  # csv/tsv/jsonl with `text` (+ optional `expected`), or .txt lines
    datasets: list[CompareData] = field(default_factory=list)
    abstain_threshold: float = 0.6  # abstain when the winning polarity's probability is below this
    calibration_bins: int = 10
    batch_size: int = 32
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_threads: Optional[int] = None  # torch threads (default: torch's choice)
    trust_remote_code: bool = False

    def check(self, where: str) -> None:
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


# --------------------------------------------------------------------------------------------
# Label sets -> polarity


_WORDS = {"neg": NEG, "negative": NEG, "neu": NEU, "neutral": NEU, "pos": POS, "positive": POS}
_STARS = re.compile(r"^([1-5])\s*stars?$")


@dataclass
class LabelMap:
    labels: list[str]
    polarity: list[int]  # per native label
    kind: str  # how the set was recognised, for the report
    stars: Optional[list[int]] = None  # per native label, for "N stars" sets

    @property
    def matrix(self) -> np.ndarray:
        """K x 3 one-hot: native probabilities @ matrix = polarity probabilities."""
        m = np.zeros((len(self.labels), 3))
        m[np.arange(len(self.labels)), self.polarity] = 1.0
        return m

    def as_dict(self) -> dict:
        return {label: POLARITIES[p] for label, p in zip(self.labels, self.polarity)}


def map_labels(labels: list[str], override: Optional[dict] = None, who: str = "model") -> LabelMap:
    """Recognise a label set (POS/NEG/NEU, positive/negative/neutral in any case, "N stars") and
    map it onto polarities; `override` ({label: polarity}) wins over recognition."""
    override = dict(override or {})
    unknown_keys = [k for k in override if k not in labels]
    if unknown_keys:
        raise RecipeError(f"{who}: label_maps names {unknown_keys}, but its labels are {labels}")
    polarity, stars, kinds = [], [], set()
    for label in labels:
        key = label.strip().lower()
        match = _STARS.match(key)
        if label in override:
            polarity.append(POLARITIES.index(override[label]))
            kinds.add("recipe mapping")
        elif key in _WORDS:
            polarity.append(_WORDS[key])
            kinds.add("polarity names")
        elif match:
            n = int(match.group(1))
            polarity.append(NEG if n < 3 else NEU if n == 3 else POS)
            kinds.add("stars")
        else:
            polarity.append(None)
        stars.append(int(match.group(1)) if match else None)
    if None in polarity or NEG not in polarity or POS not in polarity:
        example = {lb: POLARITIES[p] if p is not None else "negative|neutral|positive"
                   for lb, p in zip(labels, polarity)}
        flow = ", ".join(f"{k}: {v}" for k, v in example.items())
        raise RecipeError(f"{who}: cannot map labels {labels} onto negative/neutral/positive; map them "
                          f"in the recipe, e.g. label_maps={{'{who}': {{{flow}}}}}")
    kind = " + ".join(sorted(kinds))
    return LabelMap(list(labels), polarity, kind, stars if all(s is not None for s in stars) else None)


def collapse(probs: np.ndarray, lm: LabelMap) -> np.ndarray:
    """Native probabilities (n x K) -> polarity probabilities (n x 3), summed per polarity."""
    return np.asarray(probs, dtype=np.float64) @ lm.matrix


def verdict(polarity_probs: np.ndarray, threshold: float) -> str:
    """The polarity a model commits to, or "abstain" when it is neutral or unsure."""
    top = int(np.argmax(polarity_probs))
    if top == NEU or polarity_probs[top] < threshold:
        return "abstain"
    return POLARITIES[top]


def entropy_bits(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-300, 1.0)
    return -(np.asarray(probs) * np.log2(p)).sum(axis=-1)


# --------------------------------------------------------------------------------------------
# Calibration


def polarity_nll(logits: np.ndarray, gold: np.ndarray, lm: LabelMap, temperature: float = 1.0) -> float:
    probs = collapse(softmax(np.asarray(logits, np.float64) / temperature), lm)
    return float(-np.log(np.clip(probs[np.arange(len(gold)), gold], 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, gold: np.ndarray, lm: LabelMap, lo: float = T_RANGE[0],
                    hi: float = T_RANGE[1]) -> float:
    """T minimising the polarity NLL of softmax(logits / T) on a validation set.

    The loss is taken after the collapse to polarities (what is scored), so it need not be convex
    in T: a log-spaced grid finds the basin, a golden-section search refines it.
    """
    if not len(gold):
        return 1.0
    grid = np.exp(np.linspace(math.log(lo), math.log(hi), 161))
    losses = [polarity_nll(logits, gold, lm, t) for t in grid]
    i = int(np.argmin(losses))
    a, b = math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, len(grid) - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = polarity_nll(logits, gold, lm, math.exp(c)), polarity_nll(logits, gold, lm, math.exp(d))
    while b - a > 1e-7:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = polarity_nll(logits, gold, lm, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = polarity_nll(logits, gold, lm, math.exp(d))
    return float(math.exp((a + b) / 2))


def polarity_metrics(pol: np.ndarray, gold: np.ndarray, dataset_polarities: set, model_has_neutral: bool,
                     bins: int) -> dict:
    """Metrics of polarity probabilities against gold polarities.

    On 2-class data a neutral-capable model gets two views: `accuracy`/`f1` count a neutral answer
    as wrong; `coverage`/`selective_accuracy` treat it as an abstention.
    """
    logp = np.log(np.clip(pol, 1e-12, None))
    m = classification_metrics(logp, gold, list(POLARITIES))  # the engine's own metrics, on 3 polarities
    pred = pol.argmax(axis=-1)
    out = {"n": m["n"], "accuracy": m["accuracy"], "f1": m["f1"], "nll": m["loss"],
           "ece": expected_calibration_error(pol, gold, bins), "brier": brier_score(pol, gold),
           "mean_confidence": float(pol.max(axis=-1).mean()) if len(gold) else 0.0,
           "confusion": m["confusion"], "per_class": m["per_class"],
           "predicted_share": {POLARITIES[k]: float((pred == k).mean()) if len(gold) else 0.0 for k in range(3)}}
    if NEU not in dataset_polarities and model_has_neutral:
        covered = pred != NEU
        out["coverage"] = float(covered.mean())
        out["selective_accuracy"] = float((pred == gold)[covered].mean()) if covered.any() else None
        # forced to pick a side: which of negative/positive holds more probability
        forced = np.where(pol[:, POS] >= pol[:, NEG], POS, NEG)
        out["forced_accuracy"] = float((forced == gold).mean())
    if NEU in dataset_polarities:  # how a 2-class model fares on the examples it can get right
        polar = gold != NEU
        out["polar_only_accuracy"] = float((pred == gold)[polar].mean()) if polar.any() else None
    return out


def length_buckets(texts: list[str], correct: np.ndarray) -> list[dict]:
    words = np.fromiter((len(t.split()) for t in texts), dtype=np.int64, count=len(texts))
    edges = list(LENGTH_EDGES) + [None]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (words > lo) & ((words <= hi) if hi is not None else True)
        n = int(inside.sum())
        if n:
            out.append({"words": f"{lo + 1}-{hi}" if hi is not None else f">{lo}", "n": n,
                        "accuracy": float(correct[inside].mean())})
    return out


# --------------------------------------------------------------------------------------------
# Models


class Scorer:
    """One model: its label names, and its native logits for a list of texts."""
    name: str
    spec: str
    labels: list[str]
    kind: str
    params: Optional[int] = None

    def logits(self, texts: list[str], max_length: int, cache_dir: Optional[str]) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class VaderScorer(Scorer):
    kind = "lexicon"

    def __init__(self, spec: str):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ModelError("vader: the vaderSentiment package is not installed (pip install vaderSentiment)") from None
        self.name = self.spec = spec
        self.labels = list(POLARITIES)
        self._analyzer = SentimentIntensityAnalyzer()

    def compound(self, texts: list[str]) -> np.ndarray:
        return np.array([self._analyzer.polarity_scores(t)["compound"] for t in texts], dtype=np.float64)

    def logits(self, texts, max_length=None, cache_dir=None) -> np.ndarray:
        c = self.compound(texts)
        return VADER_SCALE * np.stack([-c, np.full_like(c, VADER_THRESHOLD), c], axis=-1)


class TransformersScorer(Scorer):
    kind = "transformers"

    def __init__(self, spec: str, recipe: CompareRecipe):
        import torch
        from transformers import AutoModelForSequenceClassification

        from engine import modeling
        from engine.distributed import Dist
        from engine.precision import Precision

        cfg = ModelConfig(name_or_path=spec, trust_remote_code=recipe.trust_remote_code)
        self.spec, self.name = spec, display_name(spec)
        self.tokenizer = modeling.load_tokenizer(cfg)
        kwargs = modeling.attention_kwargs(cfg)
        # loading info tells a trained head from one transformers just initialised at random
        self.model, info = modeling.load_pretrained("model", AutoModelForSequenceClassification.from_pretrained, cfg,
                                          output_loading_info=True, **kwargs)
        body = self.model.base_model_prefix + "."
        head = [k for k in info.get("missing_keys", ()) if not k.startswith(body)]
        if head:
            raise ModelError(f"{spec}: has no trained classification head ({', '.join(sorted(head)[:2])} "
                             f"newly initialised); compare a run's base/ or tuned/ snapshot instead")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.labels = modeling.label_names_of(self.model)
        self.params = modeling.param_counts(self.model)["total_params"]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dist = Dist(device=device)
        self.model.to(device)
        self.precision = Precision(recipe.precision, device)
        self.batch_size = recipe.batch_size
        limit = getattr(self.tokenizer, "model_max_length", None)
        self.max_length_limit = limit if isinstance(limit, int) and limit < 100_000 else None

    def logits(self, texts, max_length, cache_dir=None) -> np.ndarray:
        from engine.evaluation import predict

        if self.max_length_limit:  # e.g. BERTweet reads 128 tokens at most
            max_length = min(max_length, self.max_length_limit)
        examples = Examples(list(texts), np.zeros(len(texts), dtype=np.int64), "texts")
        tokens = data_lib.tokenize(examples, self.tokenizer, max_length, cache_dir)
        return predict(self.model, tokens, self.batch_size, self.precision, self.dist,
                       self.tokenizer.pad_token_id, self.tokenizer.padding_side == "left")

    def close(self) -> None:
        del self.model


def display_name(spec: str) -> str:
    """`runs/x/tuned` -> `x/tuned`; hub names and `vader` stay as written."""
    path = Path(spec)
    if spec.startswith(("package://",)):
        return spec[len("package://"):]
    if path.exists() and path.name in ("base", "tuned") and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    if path.exists() or spec.startswith((".", "/", "~")):
        return path.name or spec
    return spec


def load_scorer(spec: str, recipe: CompareRecipe) -> Scorer:
    return VaderScorer(spec) if spec.lower() == VADER else TransformersScorer(spec, recipe)


# --------------------------------------------------------------------------------------------
# Phrases and datasets


def load_phrases(recipe: CompareRecipe) -> list[Phrase]:
    if not recipe.phrases_file:
        return list(recipe.phrases)
    path = Path(recipe.phrases_file)
    if not path.exists():
        raise DataError(f"{path}: phrases_file does not exist")
    if path.suffix.lower() == ".txt":
        lines = data_lib.decode_file(path, "utf-8").splitlines()
        return [Phrase(line.strip()) for line in lines if line.strip()]
    if path.suffix.lower() not in data_lib.TABLE_SUFFIXES:
        raise DataError(f"{path}: phrases_file must be .txt (one phrase a line) or "
                        f"{'/'.join(data_lib.TABLE_SUFFIXES)} with columns text, expected")
    frame = data_lib.read_table(path, "utf-8")
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
    val: Optional[Examples]
    label_names: list[str]
    gold_polarity: np.ndarray  # per label id
    polarities: set

    def gold(self, ex: Examples) -> np.ndarray:
        return self.gold_polarity[ex.labels]


def _labelled(cfg: DataConfig, split: str, names: Optional[list[str]]):
    raw = data_lib.read_split(cfg, split)
    names, ids = data_lib.label_ids(raw, cfg, names)
    return names, Examples(raw.texts, ids, raw.origin)


def load_eval_set(cfg: CompareData, seed: int) -> EvalSet:
    name = cfg.name or Path(cfg.source).name
    if cfg.eval_split:
        names, pool = _labelled(cfg, cfg.eval_split, None)
    else:
        # exactly the rows a training run with this seed held out: none of them was trained on
        splits = data_lib.load_splits(dataclasses.replace(cfg, eval_size=None, train_size=None), seed)
        names, pool = splits.label_names, splits.eval
    val = None
    if cfg.val_split:
        _, val = _labelled(cfg, cfg.val_split, names)
        if cfg.val_size and cfg.val_size < len(val.texts):
            val = data_lib.take(val, data_lib.stratified_subset(val.labels, cfg.val_size, seed + 2))
        elif not cfg.val_size:
            val = None
    elif cfg.val_size:
        if cfg.val_size >= len(pool.texts):
            raise DataError(f"{pool.origin}: val_size={cfg.val_size} leaves nothing to score "
                            f"(split has {len(pool.texts)}); lower it or set val_split")
        held = data_lib.stratified_subset(pool.labels, cfg.val_size, seed + 2)
        rest = np.setdiff1d(np.arange(len(pool.texts)), held)
        val, pool = data_lib.take(pool, held), data_lib.take(pool, rest)
        val.origin += f" (temperature split: {cfg.val_size}, seed {seed + 2})"
    if cfg.eval_size is not None and cfg.eval_size < len(pool.texts):
        pool = data_lib.take(pool, data_lib.stratified_subset(pool.labels, cfg.eval_size, seed + 1))
    try:
        lm = map_labels(names, who=f"dataset '{name}'")
    except RecipeError:
        raise RecipeError(f"dataset '{name}': its labels {names} do not name polarities; set label_names "
                          f"in its entry, e.g. label_names: [negative, positive]") from None
    gold = np.asarray(lm.polarity, dtype=np.int64)
    return EvalSet(name, cfg, pool, val, names, gold, set(lm.polarity))


# --------------------------------------------------------------------------------------------
# The comparison


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def phrase_result(native: np.ndarray, lm: LabelMap, threshold: float, score: Optional[float],
                  expected: Optional[str]) -> dict:
    pol = collapse(native[None], lm)[0]
    order = np.argsort(-native)
    top, second = int(order[0]), int(order[1]) if len(order) > 1 else int(order[0])
    h = float(entropy_bits(native))
    v = verdict(pol, threshold)
    p_top = int(np.argmax(pol))
    if expected is None:
        matches = None
    elif expected == "neutral":
        matches = v == "abstain"
    else:
        matches = v == expected
    pol_sorted = np.sort(pol)[::-1]
    return {
        "distribution": {label: float(p) for label, p in zip(lm.labels, native)},
        "top_label": lm.labels[top], "top_probability": float(native[top]),
        "margin": float(native[top] - native[second]),
        "entropy_bits": h, "entropy_normalised": h / math.log2(len(native)),
        "polarity_probabilities": {POLARITIES[k]: float(pol[k]) for k in range(3)},
        "polarity": POLARITIES[p_top], "polarity_probability": float(pol[p_top]),
        "polarity_margin": float(pol_sorted[0] - pol_sorted[1]),
        "score": score, "verdict": v, "matches_expected": matches,
    }


def dataset_result(scorer: Scorer, lm: LabelMap, ev: EvalSet, bins: int) -> dict:
    started = time.perf_counter()
    max_length, cache = ev.cfg.max_length, ev.cfg.cache_dir
    test_logits = scorer.logits(ev.test.texts, max_length, cache)
    gold = ev.gold(ev.test)
    has_neutral = NEU in lm.polarity
    pol = collapse(softmax(test_logits.astype(np.float64)), lm)
    before = polarity_metrics(pol, gold, ev.polarities, has_neutral, bins)
    out = {**before, "reliability": _filled(reliability_bins(pol, gold, bins)),
           "length_buckets": length_buckets(ev.test.texts, pol.argmax(-1) == gold)}
    if ev.val is not None:
        val_logits = scorer.logits(ev.val.texts, max_length, cache)
        t = fit_temperature(val_logits, ev.gold(ev.val), lm)
        pol_t = collapse(softmax(test_logits.astype(np.float64) / t), lm)
        after = polarity_metrics(pol_t, gold, ev.polarities, has_neutral, bins)
        out["temperature"] = {
            "t": t, "fitted_on": ev.val.origin, "n_val": len(ev.val.texts),
            "before": {k: before[k] for k in ("accuracy", "nll", "ece", "brier", "mean_confidence")},
            "after": {k: after[k] for k in ("accuracy", "nll", "ece", "brier", "mean_confidence")},
            "reliability_after": _filled(reliability_bins(pol_t, gold, bins)),
        }
    out["seconds"] = round(time.perf_counter() - started, 2)
    return out


def _filled(bins: list[dict]) -> list[dict]:
    return [b for b in bins if b["n"]]


def compare(recipe: CompareRecipe) -> dict:
    """Score every model on every phrase and dataset; write report.json, report.md and plots."""
    import torch

    started, load_before = time.perf_counter(), _load_average()
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    phrases = load_phrases(recipe)
    if not phrases and not recipe.datasets:
        raise RecipeError("nothing to compare: no phrases and no datasets")
    # label sets (from the configs alone) and data fail here, before minutes of scoring
    label_maps = {}
    for spec in recipe.models:
        labels = labels_of(spec, recipe)
        label_maps[spec] = map_labels(labels, _override(recipe, spec, labels), who=spec)
    evals = [load_eval_set(d, recipe.seed) for d in recipe.datasets]
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_recipe(recipe, out / "recipe.yaml")

    models, phrase_rows = [], [{"text": p.text, "expected": p.expected, "results": {}} for p in phrases]
    data_rows = [{"name": ev.name, "source": ev.cfg.source, "labels": ev.label_names,
                  "classes": sorted(POLARITIES[k] for k in ev.polarities), "test": ev.test.origin,
                  "n": len(ev.test.texts), "n_val": len(ev.val.texts) if ev.val is not None else 0,
                  "results": {}} for ev in evals]
    for spec in recipe.models:
        t0, cpu0 = time.perf_counter(), time.process_time()
        scorer = load_scorer(spec, recipe)
        lm = label_maps[spec]
        if scorer.name in {m["name"] for m in models}:
            scorer.name = spec
        _log(f"model {scorer.name}: loaded" + (f" ({_params(scorer.params)} parameters)" if scorer.params else ""))
        if phrases:
            texts = [p.text for p in phrases]
            native = softmax(scorer.logits(texts, 512, None).astype(np.float64))
            scores = _scores(scorer, lm, texts, native)
            for row, p, n, s in zip(phrase_rows, phrases, native, scores):
                row["results"][scorer.name] = phrase_result(n, lm, recipe.abstain_threshold, s, p.expected)
        for row, ev in zip(data_rows, evals):
            _log(f"model {scorer.name}: scoring {ev.name} ({len(ev.test.texts)} + "
                 f"{row['n_val']} for the temperature)")
            row["results"][scorer.name] = dataset_result(scorer, lm, ev, recipe.calibration_bins)
        models.append({"name": scorer.name, "spec": spec, "kind": scorer.kind, "labels": scorer.labels,
                       "label_set": lm.kind, "polarity_of_label": lm.as_dict(), "params": scorer.params,
                       "seconds": round(time.perf_counter() - t0, 1),
                       "cpu_seconds": round(time.process_time() - cpu0, 1)})
        scorer.close()

    report = {
        "polarities": list(POLARITIES), "abstain_threshold": recipe.abstain_threshold,
        "models": models, "phrases": phrase_rows, "datasets": data_rows,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_cores": len(os.sched_getaffinity(0))
                    if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "device": "cuda" if torch.cuda.is_available() else "cpu", "precision": recipe.precision,
                    # on a shared machine wall times are only as good as the load allowed
                    "load_average_before": load_before, "load_average_after": _load_average()},
        "recipe": to_dict(recipe),
    }
    report["summary"] = summarise(report)
    report["plots"] = write_plots(report, out)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    _write_reports(report, out)
    return report


def _rounded(x, digits: int = 5):
    # 5 decimals are more than any metric here means, and keep a committed report.json small
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v, digits) for v in x]
    return x


def _write_reports(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(_rounded(report), indent=1), encoding="utf-8")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def labels_of(spec: str, recipe: CompareRecipe) -> list[str]:
    """A model's label names from its config alone (no weights loaded)."""
    if spec.lower() == VADER:
        return list(POLARITIES)
    from transformers import AutoConfig

    from engine import modeling

    cfg = ModelConfig(name_or_path=spec, trust_remote_code=recipe.trust_remote_code)
    config = modeling.load_pretrained("config", AutoConfig.from_pretrained, cfg)
    return [config.id2label[i] for i in range(config.num_labels)]


def _override(recipe: CompareRecipe, spec: str, labels: list[str]) -> dict:
    # "*" applies to whichever models have those labels; a model's own entry must fit its labels
    shared = {k: v for k, v in recipe.label_maps.get("*", {}).items() if k in labels}
    return {**shared, **recipe.label_maps.get(spec, {})}


def _scores(scorer: Scorer, lm: LabelMap, texts: list[str], native: np.ndarray) -> list:
    """A model's own one-number reading: VADER's compound, a star model's expected stars."""
    if isinstance(scorer, VaderScorer):
        return [float(c) for c in scorer.compound(texts)]
    if lm.stars is not None:
        return [float(v) for v in native @ np.asarray(lm.stars, dtype=np.float64)]
    return [None] * len(texts)


# --------------------------------------------------------------------------------------------
# Summary, tables, plots


def summarise(report: dict) -> dict:
    names = [m["name"] for m in report["models"]]
    s: dict = {}
    if report["phrases"]:
        sure = {n: float(np.mean([p["results"][n]["polarity_probability"] for p in report["phrases"]]))
                for n in names}
        s["phrase_confidence"] = sure
        s["most_sure_on_phrases"] = max(sure, key=sure.get)
        matched = {n: sum(bool(p["results"][n]["matches_expected"]) for p in report["phrases"]) for n in names}
        s["phrases_as_expected"] = matched
        ambiguous = [p for p in report["phrases"] if p["expected"] == "neutral"]
        if ambiguous:
            # best: abstains, with the most probability on neutral, then the least sure polarity
            def key(n):
                rs = [p["results"][n] for p in ambiguous]
                return (sum(r["verdict"] == "abstain" for r in rs),
                        np.mean([r["polarity_probabilities"]["neutral"] for r in rs]),
                        -np.mean([r["polarity_probability"] for r in rs]))
            ranked = sorted(names, key=key, reverse=True)
            s["ambiguous_ranking"] = ranked
            s["best_on_ambiguous"] = ranked[0]
    if report["datasets"]:
        conf = {n: float(np.mean([d["results"][n]["mean_confidence"] for d in report["datasets"]])) for n in names}
        acc = {n: float(np.mean([d["results"][n]["accuracy"] for d in report["datasets"]])) for n in names}
        s["dataset_confidence"] = conf
        s["dataset_accuracy"] = acc
        s["most_sure_on_datasets"] = max(conf, key=conf.get)
        s["best_per_dataset"] = {d["name"]: max(names, key=lambda n: d["results"][n]["accuracy"])
                                 for d in report["datasets"]}
    return s


def _fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _fmt_t(t: float) -> str:
    if t >= T_RANGE[1] * 0.999:
        return f">={T_RANGE[1]:g}"
    if t <= T_RANGE[0] * 1.001:
        return f"<={T_RANGE[0]:g}"
    return f"{t:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _phrase_rows(report: dict) -> list[tuple[dict, list[list[str]]]]:
    out = []
    for p in report["phrases"]:
        rows = []
        for m in report["models"]:
            r = p["results"][m["name"]]
            pp = r["polarity_probabilities"]
            rows.append([m["name"], f"{r['top_label']} {r['top_probability']:.3f}",
                         f"{pp['negative']:.2f}/{pp['neutral']:.2f}/{pp['positive']:.2f}",
                         f"{r['polarity']} {r['polarity_probability']:.3f}", f"{r['margin']:.3f}",
                         f"{r['entropy_normalised']:.2f}", _fmt(r["score"], 2), r["verdict"],
                         {True: "yes", False: "no", None: "-"}[r["matches_expected"]]])
        out.append((p, rows))
    return out


PHRASE_HEADER = ["model", "top label p", "P neg/neu/pos", "polarity p", "margin", "H/Hmax", "score",
                 "verdict", "as expected"]


def phrase_table(report: dict) -> str:
    """Plain-text phrase table for the terminal."""
    blocks = []
    for p, rows in _phrase_rows(report):
        table = [PHRASE_HEADER] + rows
        width = [max(len(r[i]) for r in table) for i in range(len(PHRASE_HEADER))]
        lines = [f'"{p["text"]}"  (expected: {p["expected"] or "-"})']
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in table]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _confusion_md(res: dict, classes: list[str], model_polarities: list[str]) -> str:
    rows = []
    for g in classes:
        i = POLARITIES.index(g)
        rows.append([g] + [str(res["confusion"][i][POLARITIES.index(c)]) for c in model_polarities])
    return _table(["true \\ predicted"] + model_polarities, rows)


def markdown(report: dict) -> str:
    mach = report["machine"]
    md = ["# Pre-trained model comparison", "",
          f"Machine: {mach['cpu_cores']} CPU core(s), {mach['torch_threads']} torch thread(s), "
          f"device {mach['device']}, precision {mach['precision']}, torch {mach['torch']}; "
          f"whole comparison {report.get('wall_seconds', 0):.0f} s wall (1-min load average "
          f"{mach.get('load_average_before')} before, {mach.get('load_average_after')} after).", "",
          "Every label set is mapped onto negative / neutral / positive and probabilities are summed per "
          f"polarity. A model abstains when its winning polarity is neutral or has probability under "
          f"{report['abstain_threshold']}. Entropy is normalised by log(number of labels) (0 sure, 1 "
          "uniform); margin is top minus second label probability; score is expected stars (star "
          "models) or the compound score (VADER).", "", "## Models", ""]
    md.append(_table(["model", "kind", "labels", "label set", "mapping", "parameters", "wall s", "CPU s"], [
        [m["name"], m["kind"], ", ".join(m["labels"]), m["label_set"],
         ", ".join(f"{k}->{v[:3]}" for k, v in m["polarity_of_label"].items()),
         _params(m["params"]), _fmt(m["seconds"], 1), _fmt(m.get("cpu_seconds"), 1)] for m in report["models"]]))
    s = report["summary"]
    if report["phrases"]:
        md += ["", "## Phrases", ""]
        for p, rows in _phrase_rows(report):
            md += [f"**\"{p['text']}\"** (expected: {p['expected'] or '-'})", "", _table(PHRASE_HEADER, rows), ""]
        md.append(f"Most sure on the phrases (mean winning-polarity probability): "
                  f"**{s['most_sure_on_phrases']}** "
                  f"({', '.join(f'{k} {v:.3f}' for k, v in s['phrase_confidence'].items())}).")
        if "best_on_ambiguous" in s:
            md.append(f"Ambiguous phrase handled best (abstains, most probability on neutral): "
                      f"**{s['best_on_ambiguous']}**; ranking: {', '.join(s['ambiguous_ranking'])}.")
    if report["datasets"]:
        md += ["", "## Datasets", ""]
        md.append("`acc`/`F1` count a neutral answer on 2-class data as wrong; `coverage` and `sel. acc` "
                  "treat it as an abstention (only for models with a neutral label). On 3-class data, "
                  "`acc pos/neg` is the accuracy on the examples whose gold label is not neutral (what a "
                  "2-class model can get right). ECE and Brier are on "
                  "the polarity probabilities; `T` is the temperature fitted on the validation examples "
                  f"(searched in [{T_RANGE[0]:g}, {T_RANGE[1]:g}]; a model at chance runs into the upper "
                  "end), `after` columns use it. Accuracy can change after scaling only where several labels "
                  "share a polarity (stars).")
        for d in report["datasets"]:
            md += ["", f"### {d['name']}", "",
                   f"{d['n']} scored examples from {d['test']}; {d['n_val']} for the temperature; "
                   f"classes: {', '.join(d['classes'])}.", ""]
            three = "neutral" in d["classes"]
            rows = []
            for m in report["models"]:
                r = d["results"][m["name"]]
                t = r.get("temperature")
                views = ([_fmt(r.get("polar_only_accuracy"))] if three else
                         [_fmt(r.get("coverage")), _fmt(r.get("selective_accuracy"))])
                rows.append([m["name"], _fmt(r["accuracy"]), _fmt(r["f1"])] + views + [
                             _fmt(r["mean_confidence"]), _fmt(r["ece"]),
                             _fmt(r["brier"]), _fmt_t(t["t"]) if t else "-",
                             _fmt(t["after"]["accuracy"]) if t else "-", _fmt(t["after"]["ece"]) if t else "-",
                             _fmt(t["after"]["brier"]) if t else "-"])
            md.append(_table(["model", "acc", "F1"] + (["acc pos/neg"] if three else ["coverage", "sel. acc"])
                             + ["confidence", "ECE", "Brier", "T", "acc after", "ECE after", "Brier after"], rows))
            md += ["", f"![reliability](reliability_{_slug(d['name'])}.png)", "", "Accuracy per length (words):", ""]
            buckets = []
            for m in report["models"]:
                for b in d["results"][m["name"]]["length_buckets"]:
                    if b["words"] not in buckets:
                        buckets.append(b["words"])
            rows = []
            counts = {b["words"]: b["n"] for b in d["results"][report["models"][0]["name"]]["length_buckets"]}
            for m in report["models"]:
                by = {b["words"]: b["accuracy"] for b in d["results"][m["name"]]["length_buckets"]}
                rows.append([m["name"]] + [_fmt(by.get(b)) for b in buckets])
            md.append(_table(["model"] + [f"{b} (n={counts.get(b, 0)})" for b in buckets], rows))
            md += ["", "<details><summary>Confusion matrices</summary>", ""]
            for m in report["models"]:
                model_pols = [p for p in POLARITIES if p in m["polarity_of_label"].values()]
                md += [f"{m['name']}:", "", _confusion_md(d["results"][m["name"]], d["classes"], model_pols), ""]
            md += ["</details>"]
        md += ["", f"Most sure on the datasets (mean confidence): **{s['most_sure_on_datasets']}**; best "
               f"accuracy per dataset: "
               + ", ".join(f"{k}: {v}" for k, v in s["best_per_dataset"].items()) + "."]
    if report.get("plots"):
        md += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in report["plots"])]
    return "\n".join(md) + "\n"


def _params(n: Optional[int]) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "dataset"


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    from PIL import Image

    fig.savefig(path, dpi=80)
    plt.close(fig)
    # a few flat colours: a 64-colour palette keeps the committed PNGs a third of the size
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=64)
    small.save(path, optimize=True)


def rewrite_report(folder: str | Path) -> dict:
    """report.md and the plots again from a saved report.json (no model runs again)."""
    folder = Path(folder)
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    report["plots"] = write_plots(report, folder)
    _write_reports(report, folder)
    return report


def write_plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on CI or servers
    import matplotlib.pyplot as plt

    written = []
    names = [m["name"] for m in report["models"]]
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    if report["phrases"]:
        rows, cols = len(report["phrases"]), len(names)
        fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols + 0.5, 1.9 * rows + 0.6), squeeze=False)
        for i, p in enumerate(report["phrases"]):
            for j, m in enumerate(report["models"]):
                ax = axes[i][j]
                r = p["results"][m["name"]]
                labels = list(r["distribution"])
                pol = [m["polarity_of_label"][lb] for lb in labels]
                shade = {"negative": "#c44e52", "neutral": "#999999", "positive": "#55a868"}
                ax.bar(range(len(labels)), list(r["distribution"].values()), color=[shade[x] for x in pol])
                ax.set_ylim(0, 1)
                ax.set_xticks(range(len(labels)))
                ax.set_xticklabels([lb[:8] for lb in labels], fontsize=6, rotation=30)
                ax.tick_params(axis="y", labelsize=6)
                ax.set_title(f"{r['verdict']} ({r['polarity_probability']:.2f})", fontsize=7)
                if i == 0:
                    ax.text(0.5, 1.25, m["name"][-28:], transform=ax.transAxes, ha="center", fontsize=7,
                            weight="bold")
                if j == 0:
                    ax.set_ylabel(p["text"][:24] + ("..." if len(p["text"]) > 24 else ""), fontsize=6)
        fig.suptitle("Probability per label (red negative, grey neutral, green positive)", fontsize=8, y=0.995)
        fig.tight_layout()
        _save(fig, out / "phrases.png")
        written.append("phrases.png")
    for d in report["datasets"]:
        fig, axes = plt.subplots(1, 2, figsize=(8, 4.0), sharey=True)
        for ax, key, title in ((axes[0], None, "before temperature scaling"),
                               (axes[1], "after", "after temperature scaling")):
            ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls="--")
            for n in names:
                r = d["results"][n]
                bins = r["reliability"] if key is None else (r.get("temperature") or {}).get("reliability_after")
                if not bins:
                    continue
                pts = [(b["confidence"], b["accuracy"]) for b in bins if b["n"]]
                if not pts:
                    continue
                ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, color=colors[n], label=n)
            ax.set_xlim(0, 1.02)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("confidence", fontsize=8)
            ax.set_title(title, fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0].set_ylabel("accuracy", fontsize=8)
        fig.suptitle(f"Reliability on {d['name']} (n={d['n']}): accuracy per confidence bin", fontsize=9)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3) or 1, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.06 * (1 + (len(labels) - 1) // 3), 1, 1))
        file = f"reliability_{_slug(d['name'])}.png"
        _save(fig, out / file)
        written.append(file)
    if report["datasets"]:
        k = len(report["datasets"])
        fig, axes = plt.subplots(1, k, figsize=(3.2 * k, 3.0), sharey=True, squeeze=False)
        for ax, d in zip(axes[0], report["datasets"]):
            for n in names:
                b = d["results"][n]["length_buckets"]
                ax.plot([x["words"] for x in b], [x["accuracy"] for x in b], marker="o", ms=3,
                        color=colors[n], label=n[-26:])
            ax.set_title(d["name"], fontsize=8)
            ax.set_xlabel("words", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_ylim(0, 1)
        axes[0][0].set_ylabel("accuracy", fontsize=8)
        axes[0][0].legend(fontsize=6)
        fig.tight_layout()
        _save(fig, out / "length_accuracy.png")
        written.append("length_accuracy.png")
    return written

"""Label sets onto one polarity scale, and the metrics and calibration measured on that scale.

Models with 2, 3 or 5 labels are made comparable by mapping every label onto negative / neutral /
positive and summing probabilities per polarity.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from engine.errors import RecipeError
from engine.metrics import brier_score, classification_metrics, expected_calibration_error, softmax

POLARITIES = ("negative", "neutral", "positive")
NEG, NEU, POS = 0, 1, 2
LENGTH_EDGES = (0, 10, 20, 40, 80, 160, 320)  # words; the last bucket is open-ended
T_RANGE = (0.05, 20.0)  # temperatures searched; a chance-level model runs into the upper end

_WORDS = {"neg": NEG, "negative": NEG, "neu": NEU, "neutral": NEU, "pos": POS, "positive": POS}
_STARS = re.compile(r"^([1-5])\s*stars?$")


@dataclass
class LabelMap:
    labels: list[str]
    polarity: list[int]  # per native label
    kind: str  # how the set was recognised, for the report
    stars: list[int] | None = None  # per native label, for "N stars" sets

    @property
    def matrix(self) -> np.ndarray:
        """K x 3 one-hot: native probabilities @ matrix = polarity probabilities."""
        m = np.zeros((len(self.labels), 3))
        m[np.arange(len(self.labels)), self.polarity] = 1.0
        return m

    def as_dict(self) -> dict:
        return {label: POLARITIES[p] for label, p in zip(self.labels, self.polarity, strict=True)}


def map_labels(labels: list[str], override: dict | None = None, who: str = "model") -> LabelMap:
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
                   for lb, p in zip(labels, polarity, strict=True)}
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
    # the engine's own metrics, on 3 polarities; macro-F1 over what the model can answer and what the
    # data holds: a 2-class model is not marked down for a neutral class that is in neither
    can_answer = {NEG, POS} | ({NEU} if model_has_neutral else set())
    m = classification_metrics(logp, gold, list(POLARITIES), f1_classes=can_answer | set(dataset_polarities))
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
    for lo, hi in pairwise(edges):
        inside = (words > lo) & ((words <= hi) if hi is not None else True)
        n = int(inside.sum())
        if n:
            out.append({"words": f"{lo + 1}-{hi}" if hi is not None else f">{lo}", "n": n,
                        "accuracy": float(correct[inside].mean())})
    return out

"""Compare pre-trained sentiment classifiers on phrases and datasets, on one polarity scale.

Models with 2, 3 or 5 labels (or the VADER lexicon) are made comparable by mapping every label onto
negative / neutral / positive and summing probabilities per polarity. Per phrase: the full
distribution, top label, polarity, margin, entropy and an abstain verdict. Per dataset: accuracy,
macro-F1, confusion, calibration (ECE, Brier, reliability diagram) before and after temperature
scaling, and accuracy per length bucket.

    python launch/compare.py --recipe recipes/compare_pretrained.yaml [key=value ...]

recipe: the schema; polarity: label sets -> polarities, metrics and temperature scaling; scorers:
the models and VADER; inputs: phrases and datasets; run: the comparison; report: markdown and plots.
"""
from engine.compare.inputs import EvalSet, load_eval_set, load_phrases
from engine.compare.polarity import (
    NEG,
    NEU,
    POLARITIES,
    POS,
    LabelMap,
    collapse,
    fit_temperature,
    map_labels,
    polarity_metrics,
    verdict,
)
from engine.compare.recipe import VADER, CompareData, CompareRecipe, Phrase
from engine.compare.report import markdown, phrase_table, rewrite_report, write_plots
from engine.compare.run import compare
from engine.compare.scorers import Scorer, TransformersScorer, VaderScorer, load_scorer

__all__ = ["NEG", "NEU", "POS", "POLARITIES", "VADER", "CompareData", "CompareRecipe", "EvalSet", "LabelMap",
           "Phrase", "Scorer", "TransformersScorer", "VaderScorer", "collapse", "compare", "fit_temperature",
           "load_eval_set", "load_phrases", "load_scorer", "map_labels", "markdown", "phrase_table",
           "polarity_metrics", "rewrite_report", "verdict", "write_plots"]

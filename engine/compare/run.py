"""Running a comparison: every model on every phrase and dataset, then the report.

Scoring runs through engine.evaluation.predict, the same code that evaluates a fine-tuning run.
"""
from __future__ import annotations

import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine.compare.inputs import EvalSet, load_eval_set, load_phrases
from engine.compare.polarity import (
    NEU,
    POLARITIES,
    LabelMap,
    collapse,
    entropy_bits,
    fit_temperature,
    length_buckets,
    map_labels,
    polarity_metrics,
    verdict,
)
from engine.compare.recipe import CompareRecipe
from engine.compare.report import format_params, summarise, write_plots, write_reports
from engine.compare.scorers import Scorer, labels_of, load_scorer, own_scores
from engine.errors import RecipeError
from engine.metrics import reliability_bins, softmax
from engine.recipe_yaml import dump_recipe, to_dict


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def phrase_result(native: np.ndarray, lm: LabelMap, threshold: float, score: float | None,
                  expected: str | None) -> dict:
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
        "distribution": {label: float(p) for label, p in zip(lm.labels, native, strict=True)},
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
        models.append(score_model(spec, label_maps[spec], recipe, phrases, evals, phrase_rows, data_rows,
                                  taken={m["name"] for m in models}))

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
    write_reports(report, out)
    return report


def score_model(spec: str, lm: LabelMap, recipe: CompareRecipe, phrases: list, evals: list[EvalSet],
                phrase_rows: list[dict], data_rows: list[dict], taken: set) -> dict:
    """Load one model, score it on every phrase and dataset (filling the rows); its report entry."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    scorer = load_scorer(spec, recipe)
    if scorer.name in taken:
        scorer.name = spec
    _log(f"model {scorer.name}: loaded"
         + (f" ({format_params(scorer.params)} parameters)" if scorer.params else ""))
    if phrases:
        texts = [p.text for p in phrases]
        native = softmax(scorer.logits(texts, 512, None).astype(np.float64))
        scores = own_scores(scorer, lm, texts, native)
        for row, p, n, s in zip(phrase_rows, phrases, native, scores, strict=True):
            row["results"][scorer.name] = phrase_result(n, lm, recipe.abstain_threshold, s, p.expected)
    for row, ev in zip(data_rows, evals, strict=True):
        _log(f"model {scorer.name}: scoring {ev.name} ({len(ev.test.texts)} + "
             f"{row['n_val']} for the temperature)")
        row["results"][scorer.name] = dataset_result(scorer, lm, ev, recipe.calibration_bins)
    entry = {"name": scorer.name, "spec": spec, "kind": scorer.kind, "labels": scorer.labels,
             "label_set": lm.kind, "polarity_of_label": lm.as_dict(), "params": scorer.params,
             "seconds": round(time.perf_counter() - t0, 1),
             "cpu_seconds": round(time.process_time() - cpu0, 1)}
    scorer.close()
    return entry


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _override(recipe: CompareRecipe, spec: str, labels: list[str]) -> dict:
    # "*" applies to whichever models have those labels; a model's own entry must fit its labels
    shared = {k: v for k, v in recipe.label_maps.get("*", {}).items() if k in labels}
    return {**shared, **recipe.label_maps.get(spec, {})}

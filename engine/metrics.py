"""Classification metrics from logits, and throughput counters. Plain numpy: no sync, no framework."""
from __future__ import annotations

import contextlib
import time

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def standard_error(p: float, n: int) -> float:
    """The binomial standard error of an accuracy p measured on n examples: sqrt(p(1-p)/n). Two
    accuracies on different draws differ by more than noise when the gap exceeds ~2 x
    sqrt(se_a^2 + se_b^2); on the same examples that is conservative (a paired test is tighter)."""
    return float(np.sqrt(p * (1 - p) / n)) if n else 0.0


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """|accuracy - confidence| per equal-width confidence bin, weighted by the bin's share."""
    conf = probs.max(axis=-1)
    correct = probs.argmax(axis=-1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over examples of sum_k (p_k - y_k)^2: 0 is perfect, 2 is sure and wrong."""
    probs = np.asarray(probs, dtype=np.float64)
    if not len(probs):
        return 0.0
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(((probs - onehot) ** 2).sum(axis=-1).mean())


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[dict]:
    """Per equal-width confidence bin (the bins ECE uses): count, mean confidence, accuracy."""
    conf = probs.max(axis=-1)
    correct = probs.argmax(axis=-1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        in_bin = which == b
        n = int(in_bin.sum())
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n,
                    "confidence": float(conf[in_bin].mean()) if n else None,
                    "accuracy": float(correct[in_bin].mean()) if n else None})
    return out


def classification_metrics(logits: np.ndarray, labels: np.ndarray, label_names: list[str],
                           f1_classes=None) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1, confusion matrix, mean loss, ECE.

    Macro-F1 averages over `f1_classes` (indices; default every class in label_names), whether the
    gold labels hold them or not.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    k = len(label_names)
    probs = softmax(logits)
    preds = probs.argmax(axis=-1)
    confusion = np.zeros((k, k), dtype=np.int64)  # rows: true class, columns: predicted
    np.add.at(confusion, (labels, preds), 1)
    tp = np.diag(confusion).astype(np.float64)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(k), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
    accuracy = float((preds == labels).mean()) if len(labels) else 0.0
    return {
        "n": int(len(labels)),
        "accuracy": accuracy,
        "accuracy_se": standard_error(accuracy, len(labels)),
        # over every class the model can predict, absent from the gold labels or not (scikit-learn's
        # f1_score(average="macro", labels=range(k))): dropping one would reward predicting it
        "f1": float(f1[list(range(k)) if f1_classes is None else sorted(f1_classes)].mean()) if k else 0.0,
        "loss": float(nll.mean()) if len(labels) else 0.0,
        "ece": expected_calibration_error(probs, labels) if len(labels) else 0.0,
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(actual[i])}
            for i, name in enumerate(label_names)
        },
        "confusion": confusion.tolist(),
        "labels": list(label_names),
    }


class Throughput:
    """Counts samples and tokens over training time only (evaluation pauses the clock)."""

    def __init__(self):
        self.samples = self.real_tokens = self.padded_tokens = 0
        self.seconds = 0.0
        self._start = None

    def start(self):
        self._start = time.perf_counter()

    def pause(self):
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def add(self, samples: int, real_tokens: int, padded_tokens: int):
        self.samples += samples
        self.real_tokens += real_tokens
        self.padded_tokens += padded_tokens

    def elapsed(self) -> float:
        running = time.perf_counter() - self._start if self._start is not None else 0.0
        return self.seconds + running

    def summary(self) -> dict:
        t = max(self.elapsed(), 1e-9)
        return {
            "train_seconds": round(self.seconds if self._start is None else self.elapsed(), 3),
            "samples": self.samples,
            "samples_per_s": self.samples / t,
            "real_tokens_per_s": self.real_tokens / t,
            "padded_tokens_per_s": self.padded_tokens / t,
            "padding_share": 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0,
        }


RATES = ("samples_per_s", "real_tokens_per_s", "padded_tokens_per_s", "padding_share")


def timed_steps(summary: dict, first_step: int) -> dict:
    """A run's throughput summary (loop.Bookkeeping.throughput) saying which steps it timed: a resumed
    process times only the steps it ran, from `first_step` on; with none left to run (resumed from
    the run's last checkpoint) it has no rates at all, rather than 0 samples/s."""
    timed = summary["steps"] - first_step
    out = {**summary, "resumed_at_step": first_step, "steps_timed": timed}
    if not timed:
        out.update(dict.fromkeys(RATES))
    return out


class TimeParts:
    """Wall seconds of a run split into named parts (load, tokenize, base_eval, ...); the rest is
    `other`. A part opened inside another counts for itself only: the outer part loses its span."""

    def __init__(self):
        self.started = time.perf_counter()
        self.parts: dict[str, float] = {}
        self._open: list[list] = []  # [start, seconds of the parts nested in it]

    @contextlib.contextmanager
    def part(self, name: str):
        frame = [time.perf_counter(), 0.0]
        self._open.append(frame)
        try:
            yield
        finally:
            self._open.pop()
            span = time.perf_counter() - frame[0]
            self.parts[name] = self.parts.get(name, 0.0) + span - frame[1]
            if self._open:
                self._open[-1][1] += span

    def wall(self) -> float:
        return time.perf_counter() - self.started

    def summary(self) -> dict:
        out = {k: round(v, 2) for k, v in self.parts.items()}
        out["other"] = round(max(0.0, self.wall() - sum(self.parts.values())), 2)
        return out

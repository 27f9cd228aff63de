"""The table of results.md from the metrics.json files beside it (<class_weights>-<seed>.metrics.json).

Standard errors, from each run's confusion matrix on its held-out examples: accuracy and each class's
recall are binomial, sqrt(p(1-p)/n) (n: the examples, or the class's support); macro-F1 by bootstrap
(examples resampled with replacement, i.e. the confusion cells drawn multinomially, 2,000 draws).

    python benchmarks/results/fpb_class_weights/summarize.py
"""
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def macro_f1(confusion: np.ndarray) -> np.ndarray:
    """Macro-F1 of each confusion matrix in a stack (..., k, k): rows true, columns predicted."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1).astype(float)
    predicted, actual = confusion.sum(-2), confusion.sum(-1)
    p = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    r = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) > 0)
    return f1.mean(-1)


def f1_se(confusion: np.ndarray, draws: int = 2000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    cells = confusion.ravel()
    resampled = rng.multinomial(cells.sum(), cells / cells.sum(), size=draws).reshape(draws, *confusion.shape)
    return float(macro_f1(resampled).std(ddof=1))


def row(name: str, m: dict) -> str:
    t = m["tuned"]
    confusion = np.array(t["confusion"])
    assert abs(macro_f1(confusion) - t["f1"]) < 1e-12  # the engine's macro-F1, recomputed
    cells = [f"{t['accuracy']:.3f} ± {t['accuracy_se']:.3f}", f"{t['f1']:.3f} ± {f1_se(confusion):.3f}"]
    for c in t["labels"]:
        r, n = t["per_class"][c]["recall"], t["per_class"][c]["support"]
        cells.append(f"{r:.3f} ± {np.sqrt(r * (1 - r) / n):.3f}")
    weights = m["train"].get("class_weights", {}).get("weights")
    w = ", ".join(f"{v:.2f}" for v in weights.values()) if weights else "1, 1, 1"
    return f"| {name} | {w} | " + " | ".join(cells) + f" | {m['train']['steps']} | {m['wall_seconds']:.0f} |"


def main() -> None:
    files = sorted(HERE.glob("*.metrics.json"))
    labels = json.loads(files[0].read_text())["tuned"]["labels"]
    print("| run | class weights (" + ", ".join(labels) + ") | accuracy | macro-F1 | "
          + " | ".join(f"recall {c}" for c in labels) + " | steps | wall s |")
    print("|---|---|---|---|" + "---|" * len(labels) + "---|---|")
    for f in files:
        print(row(f.name.removesuffix(".metrics.json"), json.loads(f.read_text())))


if __name__ == "__main__":
    main()

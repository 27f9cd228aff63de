"""The dev curve of one engine run, epoch by epoch: a table and a PNG (the seed's "10+ epochs" question).

    python benchmarks/epoch_curve.py RUN_DIR --out DIR

Reads RUN_DIR/log.jsonl (the engine's train/loss lines and its eval/ lines) and RUN_DIR/metrics.json
(steps per epoch, the dev set's size, the state keep_best kept and its test score), and writes
DIR/epochs.md, DIR/epochs.png and DIR/epochs.json: per epoch the mean training loss, dev accuracy
(± its binomial standard error) and dev loss, the kept epoch marked.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import plots  # noqa: E402


class CurveError(ValueError):
    """A run folder without what the curve needs; one line."""


def read_curve(run: Path) -> dict:
    try:
        metrics = json.loads((run / "metrics.json").read_text())
        lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError) as e:
        raise CurveError(f"{run}: no finished engine run here ({e.__class__.__name__}: {e})") from None
    per_epoch = metrics["train"]["steps_per_epoch"]
    n_dev = (metrics.get("dev") or {}).get("tuned", {}).get("n") or metrics["tuned"].get("n")
    rows, last_step, losses = [], 0, []
    for rec in lines:
        if "train/loss" in rec:  # the mean over the steps since the previous log line
            losses.append((rec["step"] - last_step, rec["train/loss"]))
            last_step = rec["step"]
        elif "eval/accuracy" in rec and rec["step"] % per_epoch == 0:  # an epoch end, not an eval_every point
            steps = sum(w for w, _ in losses)
            acc = rec["eval/accuracy"]
            rows.append({"epoch": rec["step"] // per_epoch, "step": rec["step"],
                         "train_loss": sum(w * v for w, v in losses) / steps if steps else None,
                         "dev_accuracy": acc, "dev_accuracy_se": math.sqrt(acc * (1 - acc) / n_dev),
                         "dev_loss": rec["eval/loss"]})
            losses = []
    if not rows:
        raise CurveError(f"{run / 'log.jsonl'}: no eval at an epoch end (train.epochs >= 1 evaluates at each)")
    kept = metrics["tuned"].get("step")
    return {"run": str(run), "rows": rows, "kept_step": kept, "dev_n": n_dev,
            "test": {k: metrics["tuned"].get(k) for k in ("accuracy", "accuracy_se", "n")} if "dev" in metrics
            else None}


def table(curve: dict) -> str:
    out = ["| epoch | step | train loss | dev accuracy | dev loss | kept |", "|---|---|---|---|---|---|"]
    for r in curve["rows"]:
        loss = f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "–"
        out.append(f"| {r['epoch']} | {r['step']} | {loss} | {r['dev_accuracy']:.4f} ± {r['dev_accuracy_se']:.4f} "
                   f"| {r['dev_loss']:.4f} | {'kept' if r['step'] == curve['kept_step'] else ''} |")
    test = curve["test"]
    if test and test["accuracy"] is not None:
        out += ["", f"Test ({test['n']} reviews), the kept state: {test['accuracy']:.4f} ± {test['accuracy_se']:.4f}."]
    return "\n".join(out) + "\n"


def plot(curve: dict, path: Path) -> None:
    plt = plots.pyplot()
    rows = curve["rows"]
    epochs = [r["epoch"] for r in rows]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(9, 3.4))
    acc.errorbar(epochs, [r["dev_accuracy"] for r in rows], yerr=[r["dev_accuracy_se"] for r in rows],
                 marker="o", capsize=3, label=f"dev ({curve['dev_n']})")
    kept = [r for r in rows if r["step"] == curve["kept_step"]]
    if kept:
        acc.plot([kept[0]["epoch"]], [kept[0]["dev_accuracy"]], "r*", markersize=14, label="kept")
    acc.set(xlabel="epoch", ylabel="accuracy", title="dev accuracy")
    acc.legend()
    loss.plot(epochs, [r["dev_loss"] for r in rows], marker="o", label="dev")
    loss.plot(epochs, [r["train_loss"] for r in rows], marker="s", label="train (epoch mean)")
    loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    loss.legend()
    fig.tight_layout()
    plots.save(fig, path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="an engine run's output_dir")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        curve = read_curve(Path(args.run))
    except CurveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "epochs.json").write_text(json.dumps(curve, indent=1))
    (out / "epochs.md").write_text(table(curve))
    plot(curve, out / "epochs.png")
    print(table(curve))
    return 0


if __name__ == "__main__":
    sys.exit(main())

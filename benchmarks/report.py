"""results.json -> results.md (a table) and PNG plots: throughput, accuracy against time, scaling with nproc.

    python benchmarks/report.py benchmarks/results/NAME [--summary]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# run by path (python benchmarks/report.py FOLDER): the repository root first, as in run.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.matrix import model_label
from engine.plots import pyplot, save

PLOTS = ("throughput.png", "accuracy_vs_time.png", "scaling.png")


def si(x: float | None, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "–"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g} {prefix}{unit}".strip()
    return f"{x:.{digits}g} {unit}".strip()


def num(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def acc(r: dict, key: str = "accuracy") -> str:
    """An accuracy with its standard error on the examples scored (where the record knows how many)."""
    se = r.get(f"{key}_se")  # records.summarize sets it only beside an accuracy
    return num(r.get(key), ".4f") + (f" ± {se:.4f}" if se is not None else "")


def table(records: list[dict]) -> list[str]:
    head = ["scenario", "status", "samples/s", "x baseline", "real tok/s", "padded tok/s (padding)",
            "step s: median (min–max)", "achieved FLOP/s", "MFU", "peak memory", "trainable", "base accuracy",
            "accuracy", "F1", "time to target", "outside load (cores)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        st = r["step_time_s"]
        load = r["load"]
        rows.append("| " + " | ".join([
            f"`{r['id']}`" + (" (baseline)" if r["scenario"].get("is_baseline") else "")
            + (f" (auto: {r['precision']})" if r["scenario"]["precision"] == "auto" and r.get("precision") else ""),
            r["status"].replace("|", "/"),
            num(r["samples_per_s"], ".3g"),
            num(r["ratio_to_baseline"], ".2f"),
            num(r["real_tokens_per_s"], ".4g"),
            f"{num(r['padded_tokens_per_s'], '.4g')} ({num(r['padding_share'], '.1%')})",
            f"{st['median']:.3g} ({st['min']:.3g}–{st['max']:.3g})" if st else "–",
            si(r["achieved_flops"], "FLOP/s"),
            (num(r["mfu"], ".2%") if not r.get("mfu_note") else "– (above the probe's peak)")
            + (f" ({r['mfu_datasheet']:.1%} of datasheet)" if r.get("mfu_datasheet") else ""),
            si(r["peak_memory_bytes"], "B"),
            si(r["trainable_params"]),
            acc(r, "base_accuracy"), acc(r), num(r["f1"], ".4f"),
            f"{r['time_to_target_s']:.0f} s" if r["time_to_target_s"] is not None else "–",
            (f"{load['outside_cores_mean']:.2f} (max {load['outside_cores_max']:.2f})" if load else "–")
            + (" **disturbed**" if r["disturbed"] else ""),
        ]) + " |")
    return rows


def compile_table(records: list[dict]) -> list[str]:
    """Where a scenario compiled: what compiling cost (rank 0's process: graphs, seconds) beside each
    engine row's rate over its whole training clock, compiling inside the steps included."""
    rows = [r for r in records if r["status"] == "ok" and r.get("train_samples_per_s") is not None]
    if not any(r.get("compile_seconds") is not None for r in rows):
        return []
    out = ["## Compiling", "", "| scenario | graphs compiled | compile s | samples/s (timed steps) | "
           "samples/s (whole training clock) | run wall s |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| `{r['id']}` | {num(r.get('compile_graphs'), '.0f')} | {num(r.get('compile_seconds'), '.1f')} | "
                   f"{num(r['samples_per_s'], '.3g')} | {num(r['train_samples_per_s'], '.3g')} | "
                   f"{num(r.get('run_wall_seconds'), '.0f')} |")
    return out + [""]


def markdown(res: dict) -> str:
    hw = res["hardware"]
    cpu = hw["cpu"]
    peaks = res["peak_flops"]["measured"]
    lines = [f"# Benchmark: {res['matrix']}", ""]
    if res.get("description"):
        lines += [res["description"].strip(), ""]
    lines += [f"Matrix `{res['matrix_path']}`" + (f", `--set {' '.join(res['sets'])}`" if res["sets"] else "")
              + (f", `--only {res['only']}`" if res.get("only") else "")
              + f"; run {res['started']} to {res['finished']}; commit {(res['git'].get('commit') or '?')[:12]}"
              + (" (uncommitted changes)" if res["git"].get("dirty") else "") + ".", ""]
    if res.get("interrupted"):
        lines += [f"> **Interrupted:** {res['interrupted']}. Scenarios that had not run say so; those that "
                  "ran have fewer repeats than the matrix asks for.", ""]
    if res["load"]["disturbed"]:
        lines += ["> **Disturbed:** other processes used more than "
                  f"{res['load']['threshold_cores']} cores on average during some runs (column *outside load*). "
                  "Their figures are not comparable; rerun on a quiet machine before relying on them.", ""]
    gpus = ", ".join(g["name"] for g in hw["gpus"]) or "none"
    lines += ["## Hardware", "",
              f"- CPU: {cpu.get('model')}, {cpu.get('usable_cores')} usable of "
              f"{cpu.get('logical_cores')} logical cores; "
              f"ISA: {', '.join(cpu.get('flags') or []) or '?'}; torch capability {hw.get('cpu_capability')}",
              f"- GPU: {gpus}" + (f" (driver {hw['gpu_driver']})" if hw.get("gpu_driver") else ""),
              f"- torch {hw.get('torch')}, CUDA {hw.get('cuda')}, transformers {hw.get('transformers')}, "
              f"Python {hw.get('python')}",
              "- Peak matmul, measured in this run (best of the start and end probes): "
              + ", ".join(f"{k} {si(v['flops'], 'FLOP/s')} (n={v['n']})" for k, v in peaks.items()),
              ]
    if res["peak_flops"].get("datasheet"):
        lines.append("- Datasheet peak (dense): " + ", ".join(f"{k} {si(v, 'FLOP/s')}"
                                                             for k, v in res["peak_flops"]["datasheet"].items()))
    whole = res["load"].get("whole_run")
    if whole:
        lines.append(f"- Load from other processes over the whole run: {whole['outside_cores']:.2f} cores on average "
                     f"(ours {whole['own_cores']:.2f}); a run is flagged disturbed above "
                     f"{res['load']['threshold_cores']} cores")
    lines += ["", "## Results", ""] + table(res["records"]) + [""] + compile_table(res["records"])
    if res.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in res["notes"]] + [""]
    lines += ["Rates are medians over the repeats (fresh processes, interleaved across scenarios) of the steps "
              "after warm-up; step times pool every timed step of every repeat. `batch_size` in a scenario is "
              "global (all processes), so scenarios with different process counts train the same examples per "
              "step. *x baseline* is samples/s over the Trainer baseline's on the same workload. Accuracy and "
              "F1 are the tuned model's on the eval split, for scenarios trained to the end (epochs); *base "
              "accuracy* is the untouched model's on the same examples, scored by the engine before training. "
              "Accuracy, F1 and time to target are all the model's as it trained (the evals the curve is "
              "made of): for QLoRA the 4-bit copy, under FSDP mixed precision the low-precision weight copies; "
              "the saved fp32 snapshots' accuracies are `snapshot_accuracy` / `snapshot_base_accuracy` in "
              "results.json. Where a scenario sets data.test_split, accuracy is the saved snapshots' on the "
              "test split, and the curve and time to target are the dev evals'. `± x` is the binomial standard "
              "error of one run's accuracy on the n examples scored, sqrt(p(1-p)/n): two accuracies differ by "
              "more than sampling noise when their gap exceeds about 2 x sqrt(se_a^2 + se_b^2).", "",
              "## MFU", "", res["mfu_formula"], "", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in PLOTS] + [""]
    return "\n".join(lines)


def _color(r: dict) -> str:
    if r["scenario"].get("is_baseline"):
        return "#888888"
    return "#dd8452" if r["scenario"]["runner"] == "trainer" else "#4c72b0"


def plot_throughput(records: list[dict], path: Path) -> None:
    plt = pyplot()
    ok = [r for r in records if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.42 * max(1, len(ok))))
    if ok:
        y = list(range(len(ok)))[::-1]
        vals = [r["samples_per_s"] for r in ok]
        lo = [v - r.get("samples_per_s_range", [v, v])[0] for v, r in zip(vals, ok, strict=True)]
        hi = [r.get("samples_per_s_range", [v, v])[1] - v for v, r in zip(vals, ok, strict=True)]
        bars = ax.barh(y, vals, xerr=[lo, hi], color=[_color(r) for r in ok], capsize=3)
        for bar, r in zip(bars, ok, strict=True):
            if r["disturbed"]:
                bar.set_hatch("//")
            label = f" x{r['ratio_to_baseline']:.2f}" if r["ratio_to_baseline"] else ""
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=8)
        ax.set_yticks(y, [r["id"] for r in ok], fontsize=8)
    else:
        ax.text(0.5, 0.5, "no scenario finished", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("samples/s (median of repeats; bars: min-max; hatched: disturbed)")
    ax.set_title("Training throughput per scenario (grey: Trainer baseline, orange: Trainer, blue: engine)",
                 fontsize=9)
    fig.tight_layout()
    save(fig, path, dpi=110)


def plot_accuracy(records: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for r in records:
        if r["status"] == "ok" and r.get("curve"):
            pts = sorted(r["curve"], key=lambda p: p["t"])
            ax.plot([p["t"] for p in pts], [p["accuracy"] for p in pts], marker="o", ms=3, label=r["id"])
            drawn += 1
    targets = {r["target_accuracy"] for r in records if r["target_accuracy"]}
    for t in targets:
        ax.axhline(t, color="grey", ls=":", lw=1)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no scenario trained to the end (set epochs)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("training time, s (evaluation excluded)")
    ax.set_ylabel("eval accuracy")
    ax.set_title("Accuracy against training time", fontsize=10)
    fig.tight_layout()
    save(fig, path, dpi=110)


def plot_scaling(records: list[dict], path: Path) -> None:
    """samples/s against processes, one line per strategy within each otherwise-equal group."""
    plt = pyplot()
    groups: dict[str, dict[str, list]] = {}
    for r in records:
        if r["status"] != "ok":
            continue
        s = r["scenario"]
        key = json.dumps([s["runner"], model_label(s["model"]), s["method"], s["precision"], s["compile"],
                          s["group_by_length"], s["threads"], s["batch_size"], s["max_length"], s.get("is_baseline")])
        groups.setdefault(key, {}).setdefault(s["strategy"], []).append((s["nproc"], r["samples_per_s"]))
    # groups measured at one process count only add dots: draw them only when nothing else scales
    scaling = {k: v for k, v in groups.items() if len({p[0] for pts in v.values() for p in pts}) > 1}
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for key, by_strategy in (scaling or groups).items():
        runner, model, method, precision, compiled, *_ = json.loads(key)
        single = by_strategy.get("none", [])
        for strategy, pts in by_strategy.items():
            if strategy == "none" and len(by_strategy) > 1:
                continue  # drawn as the first point of each parallel strategy's line
            pts = sorted(set(pts + (single if strategy != "none" else [])))
            label = f"{runner} {model} {method} {precision}{' compile' if compiled else ''}: {strategy}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            drawn += 1
    if drawn:
        ax.legend(fontsize=7)
    nprocs = {r["scenario"]["nproc"] for r in records if r["status"] == "ok"}
    if len(nprocs) < 2:
        ax.text(0.5, 0.9, "one process count only: no scaling axis in this matrix", ha="center",
                transform=ax.transAxes, fontsize=9)
    ax.set_xlabel("processes (nproc)")
    ax.set_ylabel("samples/s")
    ax.set_xticks(sorted(nprocs) or [1])
    ax.set_title("Scaling with processes (same global batch)", fontsize=10)
    fig.tight_layout()
    save(fig, path, dpi=110)


def write(results: dict, out: Path) -> None:
    out = Path(out)
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
    plot_throughput(results["records"], out / "throughput.png")
    plot_accuracy(results["records"], out / "accuracy_vs_time.png")
    plot_scaling(results["records"], out / "scaling.png")


def summary(records: list[dict]) -> list[str]:
    """The few columns a README headline needs, for the scenarios that ran."""
    rows = ["| scenario | samples/s | x Trainer blog recipe | MFU | base accuracy | tuned accuracy |",
            "|---|---|---|---|---|---|"]
    for r in records:
        if r["status"] != "ok":
            continue
        rows.append(f"| `{r['id']}`{' (baseline)' if r['scenario'].get('is_baseline') else ''} | "
                    f"{num(r['samples_per_s'], '.3g')} | {num(r['ratio_to_baseline'], '.2f')} | "
                    f"{num(r['mfu'], '.1%')} | {acc(r, 'base_accuracy')} | {acc(r)} |")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Redraw results.md and the plots of a results folder.")
    parser.add_argument("folder")
    parser.add_argument("--summary", action="store_true", help="print a short markdown table instead")
    args = parser.parse_args()
    res = json.loads((Path(args.folder) / "results.json").read_text())
    if args.summary:
        print("\n".join(summary(res["records"])))
    else:
        write(res, Path(args.folder))

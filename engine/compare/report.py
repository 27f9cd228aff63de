"""The comparison's report: summary, report.md, the terminal phrase table, report.json and plots."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from engine.compare.polarity import POLARITIES, T_RANGE
from engine.plots import pyplot, save


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
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)).rstrip() for r in table]
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
         format_params(m["params"]), _fmt(m["seconds"], 1), _fmt(m.get("cpu_seconds"), 1)]
        for m in report["models"]]))
    if report["phrases"]:
        md += _phrases_md(report)
    if report["datasets"]:
        md += _datasets_md(report)
    if report.get("plots"):
        md += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in report["plots"])]
    return "\n".join(md) + "\n"


def _phrases_md(report: dict) -> list[str]:
    s = report["summary"]
    md = ["", "## Phrases", ""]
    for p, rows in _phrase_rows(report):
        md += [f"**\"{p['text']}\"** (expected: {p['expected'] or '-'})", "", _table(PHRASE_HEADER, rows), ""]
    md.append(f"Most sure on the phrases (mean winning-polarity probability): "
              f"**{s['most_sure_on_phrases']}** "
              f"({', '.join(f'{k} {v:.3f}' for k, v in s['phrase_confidence'].items())}).")
    if "best_on_ambiguous" in s:
        md.append(f"Ambiguous phrase handled best (abstains, most probability on neutral): "
                  f"**{s['best_on_ambiguous']}**; ranking: {', '.join(s['ambiguous_ranking'])}.")
    return md


def _datasets_md(report: dict) -> list[str]:
    s = report["summary"]
    md = ["", "## Datasets", ""]
    md.append("`acc`/`F1` count a neutral answer on 2-class data as wrong; `coverage` and `sel. acc` "
              "treat it as an abstention (only for models with a neutral label). On 3-class data, "
              "`acc pos/neg` is the accuracy on the examples whose gold label is not neutral (what a "
              "2-class model can get right). ECE and Brier are on "
              "the polarity probabilities; `T` is the temperature fitted on the validation examples "
              f"(searched in [{T_RANGE[0]:g}, {T_RANGE[1]:g}]; a model at chance runs into the upper "
              "end), `after` columns use it. Accuracy can change after scaling only where several labels "
              "share a polarity (stars).")
    for d in report["datasets"]:
        md += _dataset_md(report["models"], d)
    md += ["", f"Most sure on the datasets (mean confidence): **{s['most_sure_on_datasets']}**; best "
           f"accuracy per dataset: "
           + ", ".join(f"{k}: {v}" for k, v in s["best_per_dataset"].items()) + "."]
    return md


def _dataset_md(models: list[dict], d: dict) -> list[str]:
    """One dataset's section: metrics before and after scaling, accuracy per length, confusion."""
    md = ["", f"### {d['name']}", "",
          f"{d['n']} scored examples from {d['test']}; {d['n_val']} for the temperature; "
          f"classes: {', '.join(d['classes'])}.", ""]
    three = "neutral" in d["classes"]
    rows = []
    for m in models:
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
    for m in models:
        for b in d["results"][m["name"]]["length_buckets"]:
            if b["words"] not in buckets:
                buckets.append(b["words"])
    rows = []
    counts = {b["words"]: b["n"] for b in d["results"][models[0]["name"]]["length_buckets"]}
    for m in models:
        by = {b["words"]: b["accuracy"] for b in d["results"][m["name"]]["length_buckets"]}
        rows.append([m["name"]] + [_fmt(by.get(b)) for b in buckets])
    md.append(_table(["model"] + [f"{b} (n={counts.get(b, 0)})" for b in buckets], rows))
    md += ["", "<details><summary>Confusion matrices</summary>", ""]
    for m in models:
        model_pols = [p for p in POLARITIES if p in m["polarity_of_label"].values()]
        md += [f"{m['name']}:", "", _confusion_md(d["results"][m["name"]], d["classes"], model_pols), ""]
    md += ["</details>"]
    return md


def format_params(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "dataset"


def _rounded(x, digits: int = 5):
    # 5 decimals are more than any metric here means, and keep a committed report.json small
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v, digits) for v in x]
    return x


def write_reports(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(_rounded(report), indent=1), encoding="utf-8")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")



def rewrite_report(folder: str | Path) -> dict:
    """report.md and the plots again from a saved report.json (no model runs again)."""
    folder = Path(folder)
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    report["plots"] = write_plots(report, folder)
    write_reports(report, folder)
    return report


# a few flat colours: a 64-colour palette keeps the committed PNGs a third of the size
PNG = {"dpi": 80, "colors": 64}


def write_plots(report: dict, out: Path) -> list[str]:
    plt = pyplot()
    names = [m["name"] for m in report["models"]]
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    written = []
    if report["phrases"]:
        written.append(_plot_phrases(plt, report, out))
    for d in report["datasets"]:
        written.append(_plot_reliability(plt, d, names, colors, out))
    if report["datasets"]:
        written.append(_plot_lengths(plt, report["datasets"], names, colors, out))
    return written


def _plot_phrases(plt, report: dict, out: Path) -> str:
    rows, cols = len(report["phrases"]), len(report["models"])
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
    save(fig, out / "phrases.png", **PNG)
    return "phrases.png"


def _plot_reliability(plt, d: dict, names: list[str], colors: dict, out: Path) -> str:
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
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, lw=1.2, color=colors[n], label=n)
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
    save(fig, out / file, **PNG)
    return file


def _plot_lengths(plt, datasets: list[dict], names: list[str], colors: dict, out: Path) -> str:
    k = len(datasets)
    fig, axes = plt.subplots(1, k, figsize=(3.2 * k, 3.0), sharey=True, squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=True):
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
    save(fig, out / "length_accuracy.png", **PNG)
    return "length_accuracy.png"

"""The harness records what compiling cost (issue 30): a compiled engine run's graphs and compile seconds
(metrics.json's train.compile_graphs / compile_seconds) and its rate over the whole training clock reach
the record and results.md; benchmarks/matrices/cpu_compile.yaml runs at the main command's settings."""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of scripts at the root, not installed

from benchmarks import readers, records, report  # noqa: E402
from benchmarks.matrix import load_matrix, validate  # noqa: E402


def _engine_run(folder: Path, train: dict) -> None:
    metrics = {"base": {"accuracy": 0.5, "f1": 0.3}, "tuned": {"accuracy": 0.8, "f1": 0.8, "n": 100},
               "train": {"train_seconds": 10.0, "samples_per_s": 6.4, **train},
               "params": {"trainable_params": 10, "total_params": 10}, "evals": []}
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "log.jsonl").write_text("".join(
        json.dumps({"step": k, "train/samples_per_s": 8.0, "train/tokens_per_s": 800.0, "train/seconds": 1.0 * k})
        + "\n" for k in range(1, 9)))


def test_compile_graphs_seconds_and_the_whole_clock_rate_reach_the_record_and_results_md(tmp_path):
    s = {**validate({"model": "m", "data": {"source": "d"}, "epochs": 1, "batch_size": 8, "warmup_steps": 2}, "t")}
    recs = []
    for name, train in (("eager", {}), ("compiled", {"compile_graphs": 6, "compile_seconds": 41.5})):
        _engine_run(tmp_path / name, train)
        run = {**readers.read_engine(tmp_path / name, s), "status": "ok", "tree_peak_rss_bytes": 1,
               "max_process_rss_bytes": 1, "load": None}
        recs.append(records.summarize({**s, "id": name}, [run], None, {}, None, 1.0))
    eager, compiled = recs
    assert (compiled["compile_graphs"], compiled["compile_seconds"]) == (6, 41.5)
    assert "compile_graphs" not in eager and "compile_seconds" not in eager
    # timed: steps 2-8 (8 samples in 1 s each); the whole clock, warm-up and compiling in: metrics.json's
    assert compiled["samples_per_s"] == pytest.approx(8.0) and compiled["train_samples_per_s"] == 6.4
    rows = report.compile_table([{**r, "ratio_to_baseline": None} for r in recs])
    assert rows[0] == "## Compiling"
    assert [r.split("|")[2:4] for r in rows[4:6]] == [[" – ", " – "], [" 6 ", " 41.5 "]]
    assert report.compile_table([eager]) == []  # nothing compiled: no such section


def test_cpu_compile_runs_the_main_commands_settings():
    """Eager, compiled and compiled with buckets, on 1 and 2 processes, each 125 steps of 8 examples a
    process, as recipes/demo_minilm_imdb.yaml trains (its one epoch on the README's 2 processes)."""
    from engine.recipe_yaml import load_recipe
    demo = load_recipe(ROOT / "recipes" / "demo_minilm_imdb.yaml")
    m = load_matrix(ROOT / "benchmarks" / "matrices" / "cpu_compile.yaml")
    rows = {s["id"]: s for s in m["scenarios"]}
    assert len(rows) == 6
    for s in rows.values():
        assert s["model"] == demo.model.name_or_path and s["max_length"] == demo.data.max_length
        data = {k: s["data"].get(k) for k in ("source", "where", "train_size", "holdout_size", "truncation",
                                              "head_tokens", "label_names")}
        assert data == {"source": demo.data.source, "where": demo.data.where, "train_size": demo.data.train_size,
                        "holdout_size": demo.data.holdout_size, "truncation": demo.data.truncation,
                        "head_tokens": demo.data.head_tokens, "label_names": demo.data.label_names}
        assert s["batch_size"] == demo.train.batch_size * s["nproc"] and s["precision"] == demo.train.precision
        assert (s["lr"], s["recipe"]["train.warmup_ratio"]) == (demo.train.lr, demo.train.warmup_ratio)
        steps = math.ceil(s["epochs"] * (demo.data.train_size // s["batch_size"]))
        assert steps == 125 and s["warmup_steps"] < steps
    assert {(s["nproc"], s["compile"], bool(s["data"].get("pad_buckets"))) for s in rows.values()} == \
           {(n, c, b) for n in (1, 2) for c, b in ((False, False), (True, False), (True, True))}
    for s in rows.values():
        if s["data"].get("pad_buckets"):
            load_recipe(None, [f"data.max_length={s['max_length']}", f"data.pad_buckets={s['data']['pad_buckets']}"])

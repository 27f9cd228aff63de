"""The benchmark harness: FLOP count, load reading, timing from the engine's log, matrices, a smoke run."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of scripts at the root, not installed

import tiny  # noqa: E402
from benchmarks import measure, report  # noqa: E402
from benchmarks.matrix import MatrixError, load_matrix  # noqa: E402
from conftest import run_cli  # noqa: E402

MATRICES = ROOT / "benchmarks" / "matrices"


# --------------------------------------------------------------------------------------------
# FLOPs


@pytest.mark.parametrize("seq_len", [32, 256])
def test_flops_per_token_matches_torchs_flop_counter(tmp_path, seq_len):
    # an independent count: torch's FlopCounterMode over a real forward + backward of a small BERT.
    # The formula counts every non-embedding weight on every token; the pooler and head run on one
    # token a sequence, so they are taken out of both sides; biases and norms are not matmuls (<1%).
    # Eager attention: the counter sees its two matmuls (it does not see inside CPU sdpa)
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=256)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    model = BertForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager")
    shape = measure.model_shape(tmp_path)
    batch = 2
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=torch.randint(0, 1000, (batch, seq_len)), labels=torch.zeros(batch, dtype=torch.long))
        out.loss.backward()
    once_a_sequence = sum(p.numel() for m in (model.bert.pooler, model.classifier) for p in m.parameters())
    counted = (counter.get_total_flops() - 6 * once_a_sequence * batch) / (batch * seq_len)
    formula = measure.flops_per_token(shape.non_embedding_params - once_a_sequence, shape.layers, shape.hidden,
                                      seq_len)
    assert counted == pytest.approx(formula, rel=0.01)


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_model_shape_counts_everything_but_embeddings(tmp_path, arch):
    import torch
    from transformers import AutoModelForSequenceClassification

    folder = tiny.make_model(tmp_path / arch, arch)
    shape = measure.model_shape(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    embeddings = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert shape.non_embedding_params == shape.total_params - embeddings > 0
    assert (shape.layers, shape.hidden) == (2, 32)  # DistilBERT's n_layers/dim read through the same names


def test_datasheet_peak_tells_h100_variants_apart():
    # the lookup is by substring: the PCIe card must not be read as the SXM one, nor an unknown GPU guessed
    sxm, pcie = measure.datasheet_peak("NVIDIA H100 80GB HBM3"), measure.datasheet_peak("NVIDIA H100 PCIe")
    assert sxm and pcie and sxm != pcie and pcie["bf16"] < sxm["bf16"]
    assert measure.datasheet_peak("Some Future GPU") is None
    assert measure.datasheet_peak(None) is None


# --------------------------------------------------------------------------------------------
# Load from /proc/stat

STAT_BEFORE = """cpu  500 0 100 1000 0 0 0 0 0 0
cpu0 100 0 50 500 10 0 0 0 0 0
cpu1 200 5 50 500 10 0 0 0 0 0
cpu2 999 0 0 0 0 0 0 0 0 0
intr 12345
"""
STAT_AFTER = """cpu  900 0 100 1000 0 0 0 0 0 0
cpu0 250 0 50 550 10 0 0 0 0 0
cpu1 300 5 60 590 10 0 0 10 0 0
cpu2 5000 0 0 0 0 0 0 0 0 0
"""


def test_parse_proc_stat_sums_the_chosen_cpus():
    t = measure.parse_proc_stat(STAT_BEFORE, {0, 1})
    assert (t.busy, t.cpus) == (100 + 50 + 200 + 5 + 50, 2)
    assert t.total == t.busy + 500 + 10 + 500 + 10
    assert measure.parse_proc_stat(STAT_BEFORE).cpus == 3
    with pytest.raises(ValueError):
        measure.parse_proc_stat("intr 1\n")


def test_outside_load_is_machine_busy_minus_our_own_cpu():
    before, after = (measure.parse_proc_stat(x, {0, 1}) for x in (STAT_BEFORE, STAT_AFTER))
    # busy grew by 150 (cpu0) + 100 + 10 + 10 steal (cpu1) = 270 ticks = 2.7 s at 100 Hz, over 2 s;
    # our tree used 1.5 s of it
    load = measure.outside_load(before, after, own_cpu_s=1.5, wall_s=2.0, ticks=100)
    assert load["machine_busy_cores"] == pytest.approx(1.35)
    assert load["outside_cores"] == pytest.approx(0.6)
    assert load["own_cores"] == pytest.approx(0.75)
    # our own accounting can exceed the jiffies (rounding): outside load never goes negative
    assert measure.outside_load(before, after, own_cpu_s=5, wall_s=2.0, ticks=100)["outside_cores"] == 0


def test_read_cpu_times_covers_the_usable_cpus():
    t = measure.read_cpu_times()
    if t is None:
        pytest.skip("no /proc/stat here")
    assert t.cpus == len(measure.usable_cpus()) and t.total >= t.busy > 0


def test_tree_rss_sums_children(tmp_path):
    import os
    import subprocess
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        import time
        time.sleep(0.3)
        assert child.pid in measure.tree_pids(os.getpid())
        assert measure.tree_rss_bytes(os.getpid()) > measure.tree_rss_bytes(child.pid) > 0
    finally:
        child.kill()
        child.wait()


# --------------------------------------------------------------------------------------------
# Timing read back from the engine's log


def test_engine_timeline_reads_the_engines_training_clock(tmp_path):
    from benchmarks.readers import engine_timeline, timed

    # a run of batch 8: steps take 1, 1, 2, 2 s; 60 real of 80 padded tokens per step. The rates
    # logged are windowed (not cumulative): the clock must come from train/seconds, not from them
    clock = [1.0, 2.0, 4.0, 6.0]
    lines = []
    for step, t in enumerate(clock, 1):
        lines.append(json.dumps({"step": step, "train/samples_per_s": 999.0, "train/seconds": t,
                                 "train/tokens_per_s": 60 * step / t, "train/padding_share": 0.25}))
    lines.insert(2, json.dumps({"step": 2, "eval/accuracy": 0.7}))  # eval lines carry no clock
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    scenario = {"batch_size": 8, "grad_accum": 1, "nproc": 1}
    line = engine_timeline(tmp_path, scenario, {})
    assert [r[1] for r in line] == pytest.approx([0.0] + clock)
    out = timed(line, warmup=2)  # steps 3 and 4 are timed: 16 samples in 4 s
    assert out["samples_per_s"] == pytest.approx(4.0)
    assert out["real_tokens_per_s"] == pytest.approx(30.0)
    assert out["padded_tokens_per_s"] == pytest.approx(40.0)
    assert out["step_times"] == pytest.approx([2.0, 2.0])
    assert out["mean_real_len"] == pytest.approx(60 / 8)
    with pytest.raises(ValueError, match="no timed steps"):
        timed(line, warmup=4)
    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 1, "train/samples_per_s": 8.0}) + "\n")
    with pytest.raises(ValueError, match="no train/seconds"):  # never a clock rebuilt from rates
        engine_timeline(tmp_path, scenario, {})


# --------------------------------------------------------------------------------------------
# Matrices


def write_matrix(tmp_path, text: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


GOOD = """
settings: {model: {build: tiny-bert}, data: {synthetic: {train: 64}}, steps: 5}
axes:
  precision: [fp32, bf16]
  parallel: [{strategy: none, nproc: 1}, {strategy: ddp, nproc: 2}]
exclude: [{strategy: ddp, precision: bf16}]
baseline: trainer
"""


def test_matrix_expands_axes_excludes_and_adds_one_baseline_per_workload(tmp_path):
    m = load_matrix(write_matrix(tmp_path, GOOD))
    ids = [s["id"] for s in m["scenarios"]]
    assert ids == ["engine-none1-full-fp32", "engine-ddp2-full-fp32", "engine-none1-full-bf16", "baseline"]
    base = m["scenarios"][-1]
    assert base["is_baseline"] and base["runner"] == "trainer" and base["precision"] == "fp32"
    assert all(s["baseline_id"] == "baseline" for s in m["scenarios"][:-1])
    pinned = load_matrix(write_matrix(tmp_path, GOOD), ["precision=bf16", "data.synthetic.train=32"])
    assert [s["id"] for s in pinned["scenarios"]] == ["engine-none1-full-bf16", "engine-ddp2-full-bf16", "baseline"]
    assert pinned["scenarios"][0]["data"]["synthetic"]["train"] == 32


@pytest.mark.parametrize("text, message", [
    (GOOD.replace("steps: 5", "steps: 5, epochs: 1"), "exactly one of 'steps' and 'epochs'"),
    (GOOD.replace("steps: 5", "stesp: 5"), "unknown setting 'stesp'"),
    (GOOD.replace("precision: [fp32, bf16]", "precision: [fp32, fp8]"), "'precision' must be one of"),
    (GOOD.replace("axes:", "axis:"), "unknown top-level key 'axis'"),
    (GOOD.replace("{build: tiny-bert}", "{build: gpt-9}"), "model.build must be one of"),
    (GOOD.replace("{synthetic: {train: 64}}", "{}"), "exactly one of 'source' and 'synthetic'"),
    ("[1, 2]", "must be a mapping"),
    ("settings: {a: [", "not valid YAML"),
])
def test_bad_matrix_stops_with_one_line_and_exit_2(tmp_path, text, message):
    path = write_matrix(tmp_path, text)
    with pytest.raises(MatrixError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_matrix(path)
    p = run_cli("benchmarks/run.py", "--matrix", path, "--out", tmp_path / "out", timeout=60)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and message.split("'")[0] in p.stderr
    assert not (tmp_path / "out").exists()


SHIPPED_MATRICES = sorted(p.stem for p in MATRICES.glob("*.yaml"))


def test_the_shipped_matrices_are_found():
    assert {"cpu_smoke", "cpu_kinds", "gpu", "gpu_trainer_levers"} <= set(SHIPPED_MATRICES)


@pytest.mark.parametrize("name", SHIPPED_MATRICES)
def test_shipped_matrices_load(name):
    m = load_matrix(MATRICES / f"{name}.yaml")
    assert m["scenarios"] and len({s["id"] for s in m["scenarios"]}) == len(m["scenarios"])


def test_cpu_kinds_needs_no_edit_per_machine():
    """Every row says precision auto, and each same-lever engine row has its Trainer twin."""
    m = load_matrix(MATRICES / "cpu_kinds.yaml")
    rows = {s["id"]: s for s in m["scenarios"]}
    assert all(s["precision"] == "auto" for s in rows.values() if not s.get("is_baseline"))
    for procs in ("1proc", "ddp2"):
        engine, trainer = rows[f"same-levers-engine-{procs}"], rows[f"same-levers-trainer-{procs}"]
        levers = ("precision", "group_by_length", "strategy", "nproc", "steps", "batch_size", "data", "repeats")
        assert {k: engine[k] for k in levers} == {k: trainer[k] for k in levers} and engine["repeats"] == 3
    demo = rows["demo-as-shipped"]
    from engine.recipe_yaml import load_recipe
    shipped = load_recipe(ROOT / "recipes" / "demo_minilm_imdb.yaml")
    assert (demo["strategy"], demo["max_length"], demo["data"]["train_size"], demo["epochs"], demo["batch_size"]) == \
           (shipped.distributed.strategy, shipped.data.max_length, shipped.data.train_size, shipped.train.epochs,
            shipped.train.batch_size * demo["nproc"])  # the harness's batch_size is global
    assert (demo["data"].get("truncation", "head"), demo["data"].get("head_tokens")) == \
           (shipped.data.truncation, shipped.data.head_tokens)
    assert rows[demo["baseline_id"]]["precision"] == "fp32"  # the blog recipe, on the demo's examples


def test_matrix_choices_are_the_engines():
    """The harness's choice settings agree with engine.config's Literal types (full = peft none)."""
    import typing

    from benchmarks.matrix import CHOICES
    from engine.config import DistributedConfig, PeftConfig, TrainConfig

    def engine(cls, key):
        return typing.get_args(typing.get_type_hints(cls)[key])

    assert set(CHOICES["strategy"]) == set(engine(DistributedConfig, "strategy"))
    assert set(CHOICES["precision"]) == set(engine(TrainConfig, "precision"))
    assert set(CHOICES["method"]) == {"full" if m == "none" else m for m in engine(PeftConfig, "method")}


def test_a_new_engine_choice_reaches_the_harness_without_an_edit():
    """A strategy the engine grows (a subclassed schema stands in for it) is one the matrix accepts."""
    import dataclasses
    from typing import Literal

    from benchmarks.matrix import harness_choices
    from engine.config import DistributedConfig, Recipe

    @dataclasses.dataclass
    class Grown(DistributedConfig):
        strategy: Literal["none", "ddp", "fsdp", "tp"] = "none"

    @dataclasses.dataclass
    class GrownRecipe(Recipe):
        distributed: Grown = dataclasses.field(default_factory=Grown)

    assert "tp" in harness_choices(GrownRecipe)["strategy"]
    assert "tp" not in harness_choices(Recipe)["strategy"]


@pytest.mark.parametrize("settings, key", [
    ("{model: m, data: {source: d, truncation: middle}, steps: 5}", "data.truncation"),
    ("{model: m, data: {source: d}, steps: 5, recipe: {train.schedule: cyclic}}", "train.schedule"),
])
def test_engine_choices_passed_through_are_checked(tmp_path, settings, key):
    with pytest.raises(MatrixError, match=f"'{key}' must be one of"):
        load_matrix(write_matrix(tmp_path, f"settings: {settings}"))


def test_scenarios_that_cannot_run_say_why(tmp_path):
    from benchmarks.prepare import Preparer

    m = load_matrix(write_matrix(tmp_path, GOOD), ["nproc=2", "strategy=none"])
    prep = Preparer(tmp_path, gpus=0)
    assert "needs ddp or fsdp" in prep.why_not(m["scenarios"][0])
    m = load_matrix(write_matrix(tmp_path, GOOD), ["batch_size=15", "nproc=2", "strategy=ddp"])
    assert "does not split evenly" in prep.why_not(m["scenarios"][0])
    m = load_matrix(write_matrix(tmp_path, GOOD), ["runner=trainer", "method=qlora"])
    assert "full fine-tuning, or LoRA through peft" in prep.why_not(m["scenarios"][0])
    m = load_matrix(write_matrix(tmp_path, GOOD), ["runner=trainer", "method=lora"])
    assert prep.why_not(m["scenarios"][0]) is None


# --------------------------------------------------------------------------------------------
# The smoke matrix, end to end (reduced: one repeat, fp32, full fine-tuning)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "results"
    work = tmp_path_factory.mktemp("work")
    p = run_cli("benchmarks/run.py", "--matrix", MATRICES / "cpu_smoke.yaml", "--out", out, "--work", work,
                "--set", "repeats=1", "--set", "precision=fp32", "--only", "^engine-.*-full-", timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_smoke_records_are_complete_and_sane(smoke):
    out, res = smoke
    recs = {r["id"]: r for r in res["records"]}
    assert set(recs) == {"engine-none1-full-fp32", "engine-ddp2-full-fp32", "baseline"}
    for r in recs.values():
        assert r["status"] == "ok", (r["id"], r["status"])
        assert r["samples_per_s"] > 0 and r["padded_tokens_per_s"] >= r["real_tokens_per_s"] > 0
        st = r["step_time_s"]
        assert 0 < st["min"] <= st["median"] <= st["max"] and st["steps"] == 32 - 3
        assert 0 < r["mfu"] < 1 and r["achieved_flops"] > 0 and r["flops_per_token"] > 0
        assert r["peak_memory_bytes"] > 50 * 2**20 and r["peak_memory_of"]
        assert r["trainable_params"] == r["total_params"] > 0 and r["non_embedding_params"] > 0
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["f1"] <= 1  # trained to the end (epochs)
        assert r["curve"] and r["target_accuracy"] == 0.8
        assert r["load"]["outside_cores_mean"] >= 0 and isinstance(r["disturbed"], bool)
        assert {"command", "wall_s", "own_cpu_s"} <= set(r["repeats"][0])
        assert set(r["scenario"]) >= {"model", "data", "max_length", "strategy", "nproc", "method", "precision",
                                      "batch_size", "epochs", "warmup_steps", "repeats"}
    assert recs["baseline"]["ratio_to_baseline"] is None
    assert recs["baseline"]["base_accuracy"] is None  # the Trainer's recipe never scores the untouched model
    assert recs["baseline"]["eval_n"] == recs["engine-none1-full-fp32"]["eval_n"]  # the same eval examples
    assert "± " in (out / "results.md").read_text()
    for key in ("engine-none1-full-fp32", "engine-ddp2-full-fp32"):  # base vs tuned, on the same examples
        rec = recs[key]
        base = json.loads((Path(rec["repeats"][0]["run_dir"]) / "metrics.json").read_text())["base"]
        assert (rec["base_accuracy"], rec["base_f1"]) == (base["accuracy"], base["f1"])
        # each accuracy with its standard error on the examples scored
        assert rec["eval_n"] == base["n"] > 0
        assert rec["accuracy_se"] == pytest.approx((rec["accuracy"] * (1 - rec["accuracy"]) / base["n"]) ** 0.5)
        assert rec["base_accuracy_se"] == pytest.approx(base["accuracy_se"])
        run = rec["repeats"][0]  # each repeat keeps the engine's own wall clock and its parts
        assert sum(run["time_parts"].values()) == pytest.approx(run["run_wall_seconds"], abs=0.2)
        assert 0 < run["run_wall_seconds"] <= run["wall_s"] and run["time_parts"]["train"] > 0
        assert rec["curve"][0] == {"step": 0, "t": 0.0, "accuracy": rec["base_accuracy"]}
    assert recs["engine-none1-full-fp32"]["ratio_to_baseline"] > 0
    assert "torchrun" in recs["engine-ddp2-full-fp32"]["repeats"][0]["command"] or \
        "torch.distributed.run" in recs["engine-ddp2-full-fp32"]["repeats"][0]["command"]
    # the same global batch whatever the process count: the same number of examples trained
    batch = {k: recs[k]["scenario"]["batch_size"] for k in ("engine-ddp2-full-fp32", "engine-none1-full-fp32")}
    assert len(set(batch.values())) == 1


def test_smoke_timeline_is_the_engines_logged_clock(smoke):
    """The harness's timeline reads the engine's train/seconds, and that clock ends at metrics.json's."""
    from benchmarks.readers import engine_timeline

    _, res = smoke
    engine = [r for r in res["records"] if r["scenario"]["runner"] == "engine"]
    assert engine
    for rec in engine:
        run_dir = Path(rec["repeats"][0]["run_dir"])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        logged = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
        clock = [x["train/seconds"] for x in logged if "train/loss" in x]
        line = engine_timeline(run_dir, rec["scenario"], metrics)
        assert [r[1] for r in line] == [0.0] + clock
        assert clock == sorted(clock) and clock[-1] == pytest.approx(metrics["train"]["train_seconds"], abs=0.05)


def test_smoke_hardware_peaks_and_reports(smoke):
    out, res = smoke
    hw = res["hardware"]
    assert hw["cpu"]["usable_cores"] >= 1 and hw["cpu"]["model"] and hw["torch"]
    assert isinstance(hw["cpu"]["flags"], list) and "gpus" in hw
    assert res["peak_flops"]["measured"]["fp32"]["flops"] > 1e8
    assert res["load"]["whole_run"]["outside_cores"] >= 0
    md = (out / "results.md").read_text()
    assert "| scenario |" in md and "6 x N + 12 x L x H x S" in md and "engine-ddp2-full-fp32" in md
    for png in ("throughput.png", "accuracy_vs_time.png", "scaling.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png


def test_compare_prints_per_scenario_ratios(smoke, tmp_path):
    # B is A with one scenario 2.5x faster and another dropped: B/A must read 2.50 there, 1.00 elsewhere
    out, _ = smoke
    res = json.loads((out / "results.json").read_text())
    faster = next(r for r in res["records"] if r["id"] == "engine-none1-full-fp32")
    assert faster["samples_per_s"]
    faster["samples_per_s"] *= 2.5
    dropped = next(r["id"] for r in res["records"] if r["id"] != faster["id"])
    res["records"] = [r for r in res["records"] if r["id"] != dropped]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps(res))
    p = run_cli("benchmarks/compare.py", out, tmp_path / "b", timeout=60)
    assert p.returncode == 0, p.stderr
    ids = {r["id"] for r in res["records"]}
    rows = {line.split()[0]: line.split() for line in p.stdout.splitlines()
            if line.split()[:1] and line.split()[0] in ids}
    assert set(rows) == ids and rows["engine-none1-full-fp32"][3] == "2.50"
    assert all(r[3] == "1.00" for i, r in rows.items() if i != "engine-none1-full-fp32" and r[1] != "-")
    assert f"only in A: {dropped}" in p.stdout
    p = run_cli("benchmarks/compare.py", out, tmp_path / "missing", timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error: ")


def test_results_folder_is_not_overwritten_by_accident(smoke):
    out, _ = smoke
    p = run_cli("benchmarks/run.py", "--matrix", MATRICES / "cpu_smoke.yaml", "--out", out, timeout=60)
    assert p.returncode == 2 and "--overwrite" in p.stderr


def test_report_redraws_a_results_folder(smoke, tmp_path):
    import shutil
    import subprocess
    out, _ = smoke
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for name in ("results.md", "throughput.png", "accuracy_vs_time.png", "scaling.png"):
        (copy / name).unlink()
    p = subprocess.run([sys.executable, "-m", "benchmarks.report", str(copy)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (copy / "results.md").read_text() == (out / "results.md").read_text()
    assert (copy / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    # by path too, as its docstring shows: it finds the repository's packages itself
    p = subprocess.run([sys.executable, "benchmarks/report.py", str(copy), "--summary"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    rows = [line for line in p.stdout.splitlines() if line.startswith("| `")]
    assert p.returncode == 0 and len(rows) == 3, p.stdout + p.stderr
    assert any("(baseline)" in line and "| – |" in line for line in rows)  # no ratio, no base score for the Trainer


def test_mfu_above_the_probed_peak_is_withheld_with_a_reason():
    """fp16 on a CPU: the probe's emulated fp16 matmul can be slower than what autocast trains with;
    an MFU over 100% would be nonsense, so the record says why it has none."""
    from benchmarks import records
    from benchmarks.matrix import validate
    s = {**validate({"model": "m", "data": {"source": "d"}, "steps": 4, "precision": "fp16"}, "t"), "id": "x"}
    shape = measure.ModelShape(non_embedding_params=10_000_000, total_params=12_000_000, layers=6, hidden=384,
                               model_type="bert")
    one = {"status": "ok", "samples_per_s": 1.0, "real_tokens_per_s": 256.0, "padded_tokens_per_s": 260.0,
           "padding_share": 0.01, "mean_real_len": 256.0, "step_times": [1.0, 1.1], "trainable_params": 1,
           "total_params": 1, "tree_peak_rss_bytes": 1, "max_process_rss_bytes": 1, "load": None}
    fpt = measure.flops_per_token(10_000_000, 6, 384, 256.0)
    below = records.summarize(s, [one], shape, {"fp16": {"flops": fpt * 256.0 * 4}}, None, 0.25)
    assert below["mfu"] == pytest.approx(0.25) and below["mfu_note"] is None
    above = records.summarize(s, [one], shape, {"fp16": {"flops": fpt * 256.0 / 3}}, None, 0.25)
    assert above["mfu"] is None and "probe" in above["mfu_note"] and above["achieved_flops"] > 0


def test_an_auto_scenario_keeps_what_it_resolved_to_and_its_mfu_uses_that_peak():
    from benchmarks import records
    from benchmarks.matrix import validate
    s = {**validate({"model": "m", "data": {"source": "d"}, "steps": 4, "precision": "auto"}, "t"), "id": "x"}
    shape = measure.ModelShape(non_embedding_params=10_000_000, total_params=12_000_000, layers=6, hidden=384,
                               model_type="bert")
    one = {"status": "ok", "samples_per_s": 1.0, "real_tokens_per_s": 256.0, "padded_tokens_per_s": 260.0,
           "padding_share": 0.01, "mean_real_len": 256.0, "step_times": [1.0, 1.1], "trainable_params": 1,
           "total_params": 1, "tree_peak_rss_bytes": 1, "max_process_rss_bytes": 1, "load": None,
           "precision": "bf16", "precision_ratio": 3.7}
    fpt = measure.flops_per_token(10_000_000, 6, 384, 256.0)
    rec = records.summarize(s, [one], shape, {"fp32": {"flops": fpt * 256.0 * 8}, "bf16": {"flops": fpt * 256.0 * 2}},
                        None, 0.25)
    assert (rec["scenario"]["precision"], rec["precision"], rec["precision_ratio"]) == ("auto", "bf16", 3.7)
    assert rec["mfu"] == pytest.approx(0.5)  # against the bf16 peak, not fp32's
    assert "(auto: bf16)" in report.table([{**rec, "ratio_to_baseline": None}])[2]


def test_interrupted_matrix_writes_what_finished_and_leaves_no_run_behind(tmp_path):
    """SIGTERM (or ctrl-C) an hour into a matrix: the run in flight is killed with its process tree,
    and results.json keeps the scenarios that finished, marked interrupted, with exit code 130."""
    import os
    import signal
    import subprocess
    import time
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen(
        [sys.executable, "benchmarks/run.py", "--matrix", str(MATRICES / "cpu_smoke.yaml"), "--out", str(out),
         "--work", str(work), "--set", "repeats=1", "--set", "precision=fp32", "--only", "^engine-none1-full-"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = work / "runs" / "engine-none1-full-fp32" / "r1"  # the baseline runs first
    deadline = time.time() + 300
    while not (second / "stdout.txt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    time.sleep(2)  # well inside the engine run
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["interrupted"] == "interrupted after 1 of 2 runs"
    recs = {r["id"]: r for r in res["records"]}
    assert recs["baseline"]["status"] == "ok" and recs["baseline"]["samples_per_s"] > 0
    assert recs["engine-none1-full-fp32"]["status"] == "not run: the matrix was interrupted first"
    assert "**Interrupted:**" in (out / "results.md").read_text()
    leftovers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if str(second) in cmdline:
            leftovers.append(cmdline.replace("\0", " "))
    assert not leftovers, leftovers


def test_qlora_accuracy_and_time_to_target_come_from_one_model(tmp_path):
    # QLoRA: the evals (the curve) score the 4-bit model as it trained; metrics.json's base/tuned are
    # the saved snapshots. The record must not time a target on one and report the other's accuracy.
    from benchmarks import readers, records

    evals = [{"step": 2, "epoch": 0, "accuracy": 0.70, "f1": 0.7, "loss": 0.6, "ece": 0.1},
             {"step": 4, "epoch": 1, "accuracy": 0.852, "f1": 0.85, "loss": 0.4, "ece": 0.1}]
    metrics = {"base": {"accuracy": 0.500, "f1": 0.33}, "tuned": {"accuracy": 0.8472, "f1": 0.847},
               "peft": {"quantized": {"base": {"accuracy": 0.510, "f1": 0.34},
                                      "tuned": {"accuracy": 0.852, "f1": 0.85}}},
               "train": {"train_seconds": 0.8}, "params": {"trainable_params": 10, "total_params": 100},
               "evals": evals}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "log.jsonl").write_text("".join(
        json.dumps({"step": k, "train/samples_per_s": 10.0, "train/tokens_per_s": 100.0, "train/seconds": 0.2 * k})
        + "\n" for k in range(1, 5)))
    s = {"id": "qlora", "batch_size": 2, "grad_accum": 1, "nproc": 1, "warmup_steps": 0, "method": "qlora",
         "target_accuracy": 0.85, "epochs": 1, "precision": "fp32"}
    run = {**readers.read_engine(tmp_path, s), "status": "ok", "tree_peak_rss_bytes": 1, "max_process_rss_bytes": 1}
    rec = records.summarize(s, [run], None, {}, None, 1.0)
    assert rec["time_to_target_s"] == pytest.approx(0.8)  # step 4 of 4, the 4-bit model's 0.852
    assert (rec["accuracy"], rec["base_accuracy"]) == (0.852, 0.510) == (rec["curve"][-1]["accuracy"],
                                                                        rec["curve"][0]["accuracy"])
    assert rec["accuracy_of"] == "the model as it trained"
    assert (rec["snapshot_accuracy"], rec["snapshot_base_accuracy"]) == (0.8472, 0.500)


def run_trainer_runner(folder: Path, model: str, data: str | dict, **settings) -> dict:
    """The harness's own Trainer command (benchmarks/prepare.py) for one scenario on the tiny model and
    data (192 reviews: 24 batches of 8; a folder, or the scenario's data mapping), run as the harness
    runs it; its bench.json."""
    import yaml

    from benchmarks.prepare import Preparer

    folder.mkdir()
    data = data if isinstance(data, dict) else {"source": data}
    matrix = {"settings": {"runner": "trainer", "model": model, "data": data, "max_length": 32,
                           "batch_size": 8, "lr": 1e-3, "precision": "fp32", **settings}}
    scenario = load_matrix(write_matrix(folder, yaml.safe_dump(matrix)))["scenarios"][0]
    out = folder / "run"
    out.mkdir()
    command = Preparer(folder, gpus=0).command(scenario, out)
    p = run_cli(*command[1:], env={"OMP_NUM_THREADS": "1"}, timeout=300)  # [0] is this Python
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads((out / "bench.json").read_text())


def test_trainer_runner_tallies_what_it_trained_with_loader_workers(tmp_path, tiny_bert, tiny_data):
    """gpu_trainer_levers.yaml gives the Trainer dataloader_num_workers, whose processes then collate:
    the tally of samples and tokens is still the trained batches', step for step, when the run stops
    mid-epoch (the loader has made batches ahead) and when it evaluates during training."""
    mid_epoch = {"steps": 10}  # of the 24 an epoch has
    alone = run_trainer_runner(tmp_path / "alone", tiny_bert, tiny_data, **mid_epoch)
    workers = run_trainer_runner(tmp_path / "workers", tiny_bert, tiny_data, **mid_epoch,
                                 trainer_args={"dataloader_num_workers": 2})
    assert alone["micro_batches"] == workers["micro_batches"] == 10
    line = alone["timeline"]
    assert [row[0] for row in line] == list(range(11)) and [row[2] for row in line] == [8 * i for i in range(11)]
    assert [row[2:] for row in workers["timeline"]] == [row[2:] for row in line]
    assert 0 < line[-1][3] < line[-1][4]  # real tokens, fewer than the padded ones
    # a whole epoch with workers, the 33 test reviews scored at steps 8, 16 and 24 and once more at the
    # end (the blog's trainer.evaluate()): only the 24 training batches count
    epoch = run_trainer_runner(tmp_path / "epoch", tiny_bert, tiny_data, epochs=1, eval_every=8,
                               trainer_args={"dataloader_num_workers": 2})
    assert epoch["micro_batches"] == 24 and [e["step"] for e in epoch["evals"]] == [8, 16, 24, 24]
    assert epoch["timeline"][-1][:1] + epoch["timeline"][-1][2:3] == [24, 192]
    assert epoch["timeline"][10][2:] == line[-1][2:]  # the same batches, in the same order, as far as both went


def test_trainer_runner_timeline_follows_an_epochs_short_last_accumulation(tmp_path, tiny_bert, tiny_data):
    """24 batches an epoch, accumulated 5 at a time: each epoch's last step trains 4 (5 steps an epoch)."""
    run = run_trainer_runner(tmp_path / "accum", tiny_bert, tiny_data, grad_accum=5, epochs=2)
    samples = {row[0]: row[2] for row in run["timeline"]}
    assert run["micro_batches"] == 48 and max(samples) == 10
    assert samples[4] == 4 * 5 * 8 and samples[5] == 192 and samples[6] == 192 + 5 * 8 and samples[10] == 384

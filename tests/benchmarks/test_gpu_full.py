"""benchmarks/gpu_full.sh (issue 24's one GPU run) as CI can check it: the dry run lists every step,
refuses a matrix whose commands would be refused and material that would not travel; the real run
records the commit it is given. And benchmarks/epoch_curve.py on a real (tiny) engine run."""
import json
import os
import shutil
import subprocess
import sys

from conftest import ROOT, run_cli, tiny_overrides


def gpu_full(tmp_path, *args, **env):
    return subprocess.run(["bash", "benchmarks/gpu_full.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable,
                                            "GPU_FULL_WORK": str(tmp_path / "work"),
                                            "GPU_MATERIAL": str(tmp_path / "no-material"), **env})


def test_dry_run_lists_every_step_and_scenario_and_writes_nothing(tmp_path):
    out = tmp_path / "full"
    p = gpu_full(tmp_path, "--dry-run", "--out", str(out))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    steps = {line.split()[0] for line in p.stdout.splitlines() if line and not line.startswith(" ")}
    assert {"prepare", "analysis1", "epochs", "epoch-curve", "limits", "levers", "levers-sync",
            "recompiles"} <= steps, p.stdout
    scenarios = {line.split()[0] for line in p.stdout.splitlines() if line.startswith("  ")}
    assert {"engine", "trainer-same-levers", "blog-recipe", "engine-10-epochs", "bert-base", "bert-base-compile",
            "bert-base-batch128", "llama1b-lora", "llama1b-trainer-lora", "llama1b-fsdp-full-actckpt",
            "llama1b-qlora", "bert-base-actckpt", "levers-plain", "levers-compile", "levers-compile-buckets",
            "levers-compile-buckets-ro"} <= scenarios, p.stdout
    # issue 30's levers: the sync-free step's share is the plain row again with the old per-step read put back
    sync = next(line for line in p.stdout.splitlines() if line.startswith("levers-sync "))
    assert "BENCH_SYNC_EACH_STEP=1" in sync and "benchmarks/levers" in sync and "--only ^levers-plain$" in sync
    listed = p.stdout.split(sync)[1].splitlines()
    assert listed[1].split()[0] == "levers-plain" and not listed[2].startswith("  "), p.stdout
    assert "no material at" in p.stdout and "a real run needs --commit" in p.stdout
    assert not out.exists() and not (tmp_path / "work").exists()


def test_dry_run_fails_when_a_command_would_be_refused(tmp_path):
    """A trainer_args key this transformers lacks (warmup_ratio is gone in transformers 5) and an
    engine override the recipe loader rejects: caught on CPU, not on the lent machine."""
    matrices = tmp_path / "matrices"
    shutil.copytree(ROOT / "benchmarks" / "matrices", matrices)
    m = matrices / "gpu_analysis1.yaml"
    m.write_text(m.read_text().replace("trainer_args: {warmup_steps: 0.06}", "trainer_args: {warmup_ratio: 0.06}"))
    p = gpu_full(tmp_path, "--dry-run", GPU_MATRICES=str(matrices))
    assert p.returncode == 1 and "trainer_args ['warmup_ratio']: not TrainingArguments fields" in p.stderr, p.stderr
    m.write_text(m.read_text().replace("train.keep_best: true", "train.keep_bets: true"))
    p = subprocess.run([sys.executable, "benchmarks/run.py", "--matrix", str(m), "--out", str(tmp_path / "o"),
                        "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "scenario engine: engine overrides:" in p.stderr and "keep_bets" in p.stderr


def test_dry_run_fails_when_the_material_would_not_travel(tmp_path):
    material = tmp_path / "material"
    (material / "model").mkdir(parents=True)
    (material / "material.json").write_text("{}")
    with open(material / "model" / "model.safetensors", "wb") as f:
        f.truncate(70 * 2**20)  # sparse: no disk, but 70 MiB to send
    p = gpu_full(tmp_path, "--dry-run", GPU_MATERIAL=str(material))
    assert p.returncode == 1 and "over the device tool's 64 MiB" in p.stderr, p.stdout[-1000:] + p.stderr
    assert "analysis1" not in p.stdout  # stops before listing steps that would not be sent


def test_real_run_needs_the_commit_and_records_it(tmp_path):
    p = gpu_full(tmp_path, "--steps", "recompiles", "--out", str(tmp_path / "full"))
    assert p.returncode == 2 and "pass --commit SHA" in p.stderr
    p = gpu_full(tmp_path, "--steps", "bogus", "--commit", "abc1234")
    assert p.returncode == 2 and "unknown step 'bogus'" in p.stderr
    p = gpu_full(tmp_path, "--steps", "recompiles", "--commit", "abc1234", "--out", str(tmp_path / "full"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    summary = (tmp_path / "full" / "summary.md").read_text()
    assert "commit abc1234 (given; this copy's .git says" in summary and "| recompiles | ok |" in summary
    assert "| prepare " not in summary  # only the steps asked for


def test_epoch_curve_tables_each_epochs_dev_score_and_marks_the_kept_one(tmp_path, tiny_bert, tiny_data):
    """A real engine run: 3 epochs, dev every 5 steps too (those are not epoch rows), keep_best, test."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# overrides only\n")
    run = tmp_path / "run"
    p = run_cli("launch/train.py", "--recipe", recipe, *tiny_overrides(tiny_bert, tiny_data, run),
                "train.keep_best=true", "train.eval_every=5", "data.holdout_size=32", "data.eval_split=null",
                "data.test_split=test", env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    p = run_cli("benchmarks/epoch_curve.py", run, "--out", tmp_path / "curve")
    assert p.returncode == 0, p.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    curve = json.loads((tmp_path / "curve" / "epochs.json").read_text())
    per_epoch = metrics["train"]["steps_per_epoch"]
    assert [r["step"] for r in curve["rows"]] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    evals = {e["step"]: e for e in metrics["evals"]}
    assert [r["dev_accuracy"] for r in curve["rows"]] == [evals[r["step"]]["accuracy"] for r in curve["rows"]]
    assert [r["dev_loss"] for r in curve["rows"]] == [evals[r["step"]]["loss"] for r in curve["rows"]]
    assert all(r["train_loss"] > 0 for r in curve["rows"])
    table = (tmp_path / "curve" / "epochs.md").read_text()
    kept = [line for line in table.splitlines()[2:] if line.endswith("| kept |")]  # under the header
    assert curve["kept_step"] == metrics["tuned"]["step"]
    if metrics["tuned"]["step"] % per_epoch == 0:  # kept at an epoch's end: that row is marked
        assert len(kept) == 1 and kept[0].split("|")[2].strip() == str(metrics["tuned"]["step"])
    assert f"Test ({metrics['tuned']['n']} reviews)" in table
    assert (tmp_path / "curve" / "epochs.png").read_bytes()[:4] == b"\x89PNG"
    p = run_cli("benchmarks/epoch_curve.py", tmp_path / "nothing", "--out", tmp_path / "c2")
    assert p.returncode == 2 and p.stderr.startswith("error: ") and not (tmp_path / "c2").exists()


def test_the_sync_row_reads_back_after_every_optimizer_step_and_only_when_asked(tmp_path):
    """benchmarks/levers/sitecustomize.py, which the levers-sync step puts on PYTHONPATH: one device-to-host
    read after each AdamW step with BENCH_SYNC_EACH_STEP=1 (the engine before issue 30), none without.
    AdamW fused, as the engine builds it: the unfused one reads its step count back itself."""
    code = ("import torch\nreads = []\nreal = torch.Tensor.item\n"
            "torch.Tensor.item = lambda t: reads.append(1) or real(t)\n"
            "p = torch.nn.Parameter(torch.ones(2))\nopt = torch.optim.AdamW([p], fused=True)\n"
            "for _ in range(3):\n    p.grad = torch.ones(2)\n    opt.step()\nprint(len(reads))")
    for flag, expected in (("1", "3"), ("0", "0")):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "benchmarks" / "levers"), "BENCH_SYNC_EACH_STEP": flag}
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode == 0 and p.stdout.strip() == expected, p.stderr[-2000:]

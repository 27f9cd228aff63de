"""The real all-MiniLM-L6-v2 (pip package) on the real IMDB parquet files in ../shared/data."""
import json

from conftest import SHARED_DATA, needs_minilm, needs_shared_data, run_cli


@needs_shared_data()
@needs_minilm()
def test_real_minilm_trains_a_few_steps_on_shared_imdb(tmp_path):
    out = tmp_path / "run"
    p = run_cli("launch/train.py", "--recipe", "recipes/imdb_minilm_local.yaml", f"output_dir={out}",
                f"data.source={SHARED_DATA / 'imdb'}", "data.train_size=96", "data.eval_size=64",
                "data.max_length=128", "train.max_steps=6", "train.lr=1e-4", "train.log_every=2")
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["base"]["n"] == m["tuned"]["n"] == 64
    assert m["train"]["steps"] == 6 and m["train"]["samples"] == 96
    assert m["base"]["sha256"] != m["tuned"]["sha256"]
    assert m["data"]["labels"] == ["negative", "positive"]
    from transformers import pipeline
    clf = pipeline("text-classification", model=str(out / "tuned"))
    assert clf("A wonderful film.")[0]["label"] in {"negative", "positive"}

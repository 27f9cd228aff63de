"""The bounded-memory readers give the same examples, labels, class names and order as the
whole-file pandas readers they replaced, on every source kind and on the real data.

EXPECTED holds digests computed with the old readers (commit ee021e4) on the same fixtures:
`python tests/test_sources_equivalence.py` prints them for the code checked out.
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import SHARED_DATA as _SHARED  # noqa: E402
from engine.config import DataConfig  # noqa: E402
from engine.sources import load_eval_split, load_splits  # noqa: E402

# the project's shared/ folder beside a checkout, else the machine's (a worktree sits deeper)
SHARED_DATA = _SHARED if _SHARED.exists() else Path("/work/shared/data")
WORDS = ["good", "bad", "plot", 'say "hi"', "a,b", "line\nbreak", "caf\u00e9", "tab", "x" * 40, "ok"]


def _texts(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=1 + i % 7)) + f" #{i}" for i in range(n)]


def make_fixtures(root: Path) -> dict[str, tuple[DataConfig, int]]:
    """name -> (recipe data section, seed), one per source kind and subset rule."""
    root.mkdir(parents=True, exist_ok=True)
    cases = {}
    n = 157
    labels = [["neg", "pos", "neutral"][i % 3] for i in range(n)]
    frame = pd.DataFrame({"review": _texts(n, 0), "stars": labels, "kind": ["a", "b"] * (n // 2) + ["a"]})
    frame.to_csv(root / "one.csv", index=False)
    cases["csv_single_where_rename_holdout"] = (DataConfig(
        source=str(root / "one.csv"), eval_split=None, holdout_size=20, train_size=60, eval_size=15,
        where={"kind": "a"}, rename_columns={"review": "text", "stars": "label"}), 3)
    for fmt in ("csv", "tsv", "jsonl", "parquet"):
        folder = root / fmt
        folder.mkdir()
        for split, m, seed in (("train", 211, 1), ("test", 97, 2), ("dev", 40, 3)):
            texts = _texts(m, seed)
            if fmt == "tsv":
                texts = [t.replace("\n", " ").replace("\t", " ") for t in texts]
            f = pd.DataFrame({"text": texts, "label": [(i * 7) % 2 for i in range(m)]})
            if fmt == "csv":
                f.to_csv(folder / f"{split}.csv", index=False)
            elif fmt == "tsv":
                f.to_csv(folder / f"{split}.tsv", index=False, sep="\t", quoting=3)
            elif fmt == "jsonl":
                f.to_json(folder / f"{split}.jsonl", orient="records", lines=True)
            else:
                f.to_parquet(folder / f"{split}.parquet")
        cases[f"{fmt}_folder_subsets"] = (DataConfig(source=str(folder), train_size=101, eval_size=33,
                                                     test_split="dev", test_size=21), 7)
        cases[f"{fmt}_folder_whole"] = (DataConfig(source=str(folder)), 0)
    acl = root / "acl"
    for split in ("train", "test"):
        for sub, m in (("pos", 23), ("neg", 19)):
            (acl / split / sub).mkdir(parents=True)
            for i in range(m):
                (acl / split / sub / f"{i}_{i % 10}.txt").write_text(f"{sub} {split} review {i} <br />x")
    cases["aclimdb_holdout"] = (DataConfig(source=str(acl), eval_split=None, holdout_size=9), 5)
    cases["aclimdb_test"] = (DataConfig(source=str(acl), train_size=30), 5)
    tw = root / "tweets"
    tw.mkdir()
    for split, m in (("val", 60), ("test", 45)):
        (tw / f"{split}_text.txt").write_text("".join(f"tweet {split} {i} \u2019\n" for i in range(m)))
        (tw / f"{split}_labels.txt").write_text("".join(f"{i % 3}\n" for i in range(m)))
    (tw / "mapping.txt").write_text("0\tnegative\n1\tneutral\n2\tpositive\n")
    cases["tweeteval_pair"] = (DataConfig(source=str(tw), train_split="val", eval_split="test", eval_size=20), 1)
    latin = root / "latin"
    latin.mkdir()
    (latin / "train.csv").write_bytes(b"label,news\n" + "".join(
        f"{['positive', 'negative'][i % 2]},caf\u00e9 news {i}\n" for i in range(50)).encode("latin-1"))
    cases["latin1_csv"] = (DataConfig(source=str(latin / "train.csv"), eval_split=None, holdout_size=10,
                                      encoding="latin-1", text_column="news"), 2)
    return cases


def real_cases() -> dict[str, tuple[DataConfig, int]]:
    d = SHARED_DATA
    return {
        "imdb_holdout_train_size": (DataConfig(source=str(d / "imdb"), eval_split=None, holdout_size=1000,
                                               train_size=24000, test_split="test"), 42),
        "imdb_subsets": (DataConfig(source=str(d / "imdb"), train_size=2000, eval_size=500), 13),
        "sst2": (DataConfig(source=str(d / "sst2"), eval_split=None, holdout_size=800, text_column="sentence",
                            train_size=5000), 42),
        "tweet_eval": (DataConfig(source=str(d / "tweet_eval_sentiment"), train_split="val",
                                  eval_split="test"), 42),
        "financial_phrasebank": (DataConfig(source=str(d / "financial_phrasebank" / "all-data.csv"),
                                            eval_split=None, holdout_size=500, encoding="latin-1",
                                            text_column="news"), 42),
    }


def digest(cfg: DataConfig, seed: int) -> str:
    s = load_splits(cfg, seed)
    h = hashlib.sha256(json.dumps(s.label_names).encode())
    for part in (s.train, s.eval, s.test):
        if part is None:
            continue
        for text in part.texts:
            h.update(text.encode("utf-8", "surrogatepass") + b"\0")
        h.update(np.asarray(part.labels, np.int64).tobytes())
    return h.hexdigest()[:24]


def eval_digest(cfg: DataConfig) -> str:
    ex = load_eval_split(cfg, cfg.eval_split)
    h = hashlib.sha256()
    for text in ex.texts:
        h.update(text.encode() + b"\0")
    h.update(np.asarray(ex.labels, np.int64).tobytes())
    return h.hexdigest()[:24]


def fake_hub(name, split):
    """A hub dataset as `datasets.load_dataset` returns one: Arrow, the label a ClassLabel."""
    import datasets

    n = {"train": 120, "test": 50}[split]
    return datasets.Dataset.from_dict(
        {"text": _texts(n, {"train": 11, "test": 12}[split]), "label": [i % 2 for i in range(n)]},
        features=datasets.Features({"text": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=["neg", "pos"])}))


def token_digest(truncation: str) -> str:
    """The IMDB subsets as all-MiniLM-L6-v2 token ids (the token store's contents)."""
    from transformers import AutoTokenizer

    from conftest import minilm_path
    from engine.batching import tokenize
    from engine.evaluation import eval_set_digest

    tok = AutoTokenizer.from_pretrained(minilm_path())
    s = load_splits(*real_cases()["imdb_subsets"])
    return "".join(eval_set_digest(tokenize(part, tok, 256, None, truncation=truncation, head_tokens=64))[:12]
                   for part in (s.train, s.eval))


EXPECTED = {  # computed with the old whole-file readers and .npz token cache (commit ee021e4)
    "csv_single_where_rename_holdout": "ea2dbf3cbd4aa8c84004311b",
    "csv_folder_subsets": "147615e2553f6dc634aeb925",
    "csv_folder_whole": "07d950964acdceacedff8b80",
    "tsv_folder_subsets": "041b09a4352f67112cda6499",
    "tsv_folder_whole": "c6cebdff4c4ba3c987ceb623",
    "jsonl_folder_subsets": "147615e2553f6dc634aeb925",
    "jsonl_folder_whole": "07d950964acdceacedff8b80",
    "parquet_folder_subsets": "147615e2553f6dc634aeb925",
    "parquet_folder_whole": "07d950964acdceacedff8b80",
    "aclimdb_holdout": "99de23200e41a9ee2edd9d2c",
    "aclimdb_test": "b53da81e4e0b30620b4662a9",
    "tweeteval_pair": "3127dc24a530ecd4c0efb4ec",
    "latin1_csv": "1b3209a2e11532ea13f58fb3",
    "eval_only_parquet": "d7663d36283de167e0d47cb2",
    "imdb_holdout_train_size": "cd11744dd02db952f6708069",
    "imdb_subsets": "340c34d8b9634a730bedab62",
    "sst2": "4e92642f71625067577a7970",
    "tweet_eval": "b3b454f069f62ee1580ddd80",
    "financial_phrasebank": "8b6ad0b72d4e09fab3d6ae67",
    "hub": "fa5951ac8c3b5e53409d6ef1",
    "tokens_imdb_minilm_head": "7d944597c5fba45bcd842863",
    "tokens_imdb_minilm_head_tail": "4b756f438bcf0a29da8aa694",
}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return make_fixtures(tmp_path_factory.mktemp("equiv"))


@pytest.mark.parametrize("name", [
    "csv_single_where_rename_holdout", "csv_folder_subsets", "csv_folder_whole", "tsv_folder_subsets",
    "tsv_folder_whole", "jsonl_folder_subsets", "jsonl_folder_whole", "parquet_folder_subsets",
    "parquet_folder_whole", "aclimdb_holdout", "aclimdb_test", "tweeteval_pair", "latin1_csv"])
def test_same_examples_as_the_old_readers(fixtures, name):
    assert digest(*fixtures[name]) == EXPECTED[name]


def test_eval_only_split_as_before(fixtures):
    cfg, _ = fixtures["parquet_folder_subsets"]
    assert eval_digest(cfg) == EXPECTED["eval_only_parquet"]


@pytest.mark.skipif(not (SHARED_DATA / "imdb" / "train.parquet").exists(), reason="no shared data")
@pytest.mark.parametrize("name", ["imdb_holdout_train_size", "imdb_subsets", "sst2", "tweet_eval",
                                  "financial_phrasebank"])
def test_real_data_same_examples_as_before(name):
    assert digest(*real_cases()[name]) == EXPECTED[name]


@pytest.mark.skipif(not (SHARED_DATA / "imdb" / "train.parquet").exists(), reason="no shared data")
@pytest.mark.parametrize("truncation", ["head", "head_tail"])
def test_real_token_ids_same_as_before(truncation):
    from conftest import minilm_path

    if minilm_path() is None:
        pytest.skip("all-MiniLM-L6-v2 not installed")
    assert token_digest(truncation) == EXPECTED[f"tokens_imdb_minilm_{truncation}"]


def test_hub_dataset_same_examples_as_before(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    assert digest(DataConfig(source="someone/imdb", train_size=70, eval_size=30), 4) == EXPECTED["hub"]


if __name__ == "__main__":  # print the digests of the checked-out readers
    import tempfile

    import datasets

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cfg, seed) in make_fixtures(Path(tmp)).items():
            out[name] = digest(cfg, seed)
        out["eval_only_parquet"] = eval_digest(make_fixtures(Path(tmp) / "again")["parquet_folder_subsets"][0])
    for name, (cfg, seed) in real_cases().items():
        out[name] = digest(cfg, seed)

    datasets.load_dataset = fake_hub
    out["hub"] = digest(DataConfig(source="someone/imdb", train_size=70, eval_size=30), 4)
    for truncation in ("head", "head_tail"):
        out[f"tokens_imdb_minilm_{truncation}"] = token_digest(truncation)
    print(json.dumps(out, indent=1))

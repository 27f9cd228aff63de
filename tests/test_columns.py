"""A split's texts on disk (engine/columns.py): under data.cache_dir when set, in a file that never has
a name, so no process sees or removes another's (a cache shared by hosts or containers is safe)."""
import os
import subprocess
import sys

import pandas as pd
import pytest

from engine import sources
from engine.config import DataConfig
from engine.errors import DataError
from engine.sources import load_splits


def _data(folder, n=30):
    folder.mkdir(parents=True)
    frame = pd.DataFrame({"text": [f"review {i}" for i in range(n)], "label": [i % 2 for i in range(n)]})
    for split in ("train", "test"):
        frame.to_csv(folder / f"{split}.csv", index=False)
    return str(folder)


@pytest.fixture
def home_unwritable(tmp_path, monkeypatch):
    """The user cache below a plain file: nothing can be created there, not even by root."""
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a_file" / "cache"))


def test_texts_live_in_data_cache_dir(tmp_path, home_unwritable):
    s = load_splits(DataConfig(source=_data(tmp_path / "d"), cache_dir=str(tmp_path / "mine")), seed=0)
    assert list(s.train.texts) == [f"review {i}" for i in range(30)]


def test_an_unwritable_cache_is_one_line_naming_data_cache_dir(tmp_path, home_unwritable):
    with pytest.raises(DataError, match=r"a_file/cache/sentiment-engine: cannot write the split's texts there "
                                        r"\(.*\); set data.cache_dir to a writable folder"):
        load_splits(DataConfig(source=_data(tmp_path / "d")), seed=0)


def test_other_processes_files_are_never_touched(tmp_path):
    # a <pid>.*.arrow whose pid this host does not run may be another host's, being written now
    folder = tmp_path / "cache" / "sentiment-engine"  # conftest points XDG_CACHE_HOME here
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for sub in (folder, folder / "sources"):
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{dead.stdout.strip()}.abc.arrow").write_bytes(b"another host's texts")
    load_splits(DataConfig(source=_data(tmp_path / "d")), seed=0)
    for sub in (folder, folder / "sources"):
        assert (sub / f"{dead.stdout.strip()}.abc.arrow").read_bytes() == b"another host's texts"


@pytest.mark.parametrize("cache_dir", [None, "mine"])
def test_the_texts_file_never_has_a_name(tmp_path, monkeypatch, cache_dir):
    # nothing named, while reading or after: a killed reader leaves nothing behind for anyone to clean
    roots = [tmp_path / "cache"] + ([tmp_path / cache_dir] if cache_dir else [])
    seen = []
    real = sources._select
    monkeypatch.setattr(sources, "_select", lambda f, *a: seen.extend(
        p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()) or real(f, *a))
    cfg = DataConfig(source=_data(tmp_path / "d"), cache_dir=str(tmp_path / cache_dir) if cache_dir else None)
    s = load_splits(cfg, seed=0)
    assert s.eval.texts[29] == "review 29"
    assert seen == [] and not [p for root in roots for p in root.rglob("*") if p.is_file()]
    assert sorted(os.listdir(tmp_path / "d")) == ["test.csv", "train.csv"]  # nor beside the data

"""The on-disk token store: what it holds, that a damaged or half-written store is rebuilt and never
trusted, that the processes of a node tokenize once, and that sources are read into it in bounded pieces."""
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tiny
from engine import batching, columns, readers, sources
from engine.batching import TokenRows, store_rows, tokenize
from engine.config import DataConfig
from engine.sources import Column, Examples, load_splits

TEXTS = [" ".join(["good", "movie", "bad", "film", "indeed"][: 1 + i % 5]) + " plot" * (i % 7) for i in range(50)]


def _examples(n=50):
    return Examples(TEXTS[:n], np.arange(n) % 2, "x")


def _reference(tok, texts, max_length=16):
    return [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]


def _store(folder: Path) -> Path:
    headers = list(folder.glob("*.json"))
    assert len(headers) == 1
    return headers[0].with_suffix("")


def test_store_holds_the_tokenizers_ids_compactly(tmp_path):
    tok = tiny.make_tokenizer()
    got = tokenize(_examples(), tok, 16, str(tmp_path))
    assert isinstance(got.ids, TokenRows) and got.ids.flat.dtype == np.uint16  # a small vocabulary fits 16 bits
    assert [x.tolist() for x in got.ids] == _reference(tok, TEXTS)
    assert got.lengths.tolist() == [len(x) for x in _reference(tok, TEXTS)] and len(got) == 50
    store = _store(tmp_path)
    assert Path(f"{store}.ids").stat().st_size == 2 * int(got.lengths.sum())


def test_chunked_encoding_gives_the_same_ids_as_one_call(tmp_path, monkeypatch):
    tok = tiny.make_tokenizer()
    monkeypatch.setattr(batching, "ENCODE_ROWS", 7)  # chunk edges fall inside the list
    for truncation in ("head", "tail", "head_tail"):
        one = tokenize(_examples(), tok, 9, str(tmp_path / "one"), truncation=truncation, head_tokens=3)
        monkeypatch.setattr(batching, "_fast_encoder", lambda *a: None)  # the transformers call instead
        slow = tokenize(_examples(), tok, 9, str(tmp_path / "slow"), truncation=truncation, head_tokens=3)
        monkeypatch.undo()
        monkeypatch.setattr(batching, "ENCODE_ROWS", 7)
        assert [x.tolist() for x in one.ids] == [x.tolist() for x in slow.ids]


@pytest.mark.parametrize("damage", ["ids cut short", "offsets changed", "header gone", "header of another"])
def test_damaged_store_is_rebuilt(tmp_path, damage):
    tok = tiny.make_tokenizer()
    good = [x.tolist() for x in tokenize(_examples(), tok, 16, str(tmp_path)).ids]
    store = _store(tmp_path)
    if damage == "ids cut short":
        with open(f"{store}.ids", "r+b") as f:
            f.truncate(10)
    elif damage == "offsets changed":
        offsets = np.load(f"{store}.offsets.npy")
        offsets[3] += 1
        np.save(f"{store}.offsets.npy", offsets)
    elif damage == "header gone":
        Path(f"{store}.json").unlink()
    else:
        Path(f"{store}.json").write_text('{"format": 1, "dtype": "uint16", "rows": 3, "tokens": 9}')
    assert store_rows(store) is None  # not trusted
    again = tokenize(_examples(), tok, 16, str(tmp_path))
    assert [x.tolist() for x in again.ids] == good and store_rows(store) is not None


def test_tokenization_failing_half_way_leaves_nothing_trusted(tmp_path, monkeypatch):
    tok = tiny.make_tokenizer()
    real = batching._encoded_chunks

    def dies_after_one_chunk(*a, **k):
        gen = real(*a, **k)
        yield next(gen)
        raise KeyboardInterrupt  # a Ctrl-C between two chunks

    monkeypatch.setattr(batching, "ENCODE_ROWS", 10)
    monkeypatch.setattr(batching, "_encoded_chunks", dies_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        tokenize(_examples(), tok, 16, str(tmp_path))
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.ids"))
    assert not list(tmp_path.glob("*.tmp*"))  # its temporary files are gone too
    monkeypatch.setattr(batching, "_encoded_chunks", real)
    assert [x.tolist() for x in tokenize(_examples(), tok, 16, str(tmp_path)).ids] == _reference(tok, TEXTS)


KILLED_WRITER = """
import sys, time
import numpy as np
from engine import batching
def chunks():
    yield [[1, 2, 3]] * 100
    print("wrote", flush=True)
    time.sleep(600)
batching.write_store(__import__("pathlib").Path(sys.argv[1]), chunks(), np.uint16, 100)
"""


def test_tokenization_killed_half_way_is_rebuilt(tmp_path):
    tok = tiny.make_tokenizer()
    tokenize(_examples(), tok, 16, str(tmp_path / "probe"))
    store = tmp_path / _store(tmp_path / "probe").name  # the key a later run looks up
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(store)], stdout=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1], text=True)
    assert proc.stdout.readline().strip() == "wrote"
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup runs
    proc.wait()
    assert list(tmp_path.glob("*.tmp*")) and store_rows(store) is None
    got = tokenize(_examples(), tok, 16, str(tmp_path))
    assert [x.tolist() for x in got.ids] == _reference(tok, TEXTS)


def _tokenize_in_process(cache, log, start_at):
    from engine import batching as b

    real = b.write_store

    def counted(*a, **k):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # a long tokenization: the other process must wait, not build its own
        return real(*a, **k)

    b.write_store = counted
    time.sleep(max(0.0, start_at - time.time()))
    got = b.tokenize(_examples(), tiny.make_tokenizer(), 16, cache)
    return [x.tolist() for x in got.ids]


def test_processes_of_a_node_tokenize_once(tmp_path):
    log = tmp_path / "builds.log"
    start_at = time.time() + 3.0
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_tokenize_in_process, [(str(tmp_path / "tokens"), str(log), start_at)] * 2)
    assert len(log.read_text().split()) == 1  # one build, the other process mapped it
    assert results[0] == results[1] == _reference(tiny.make_tokenizer(), TEXTS)


def test_sources_are_read_in_chunks_and_kept_on_disk(tmp_path, monkeypatch):
    n = 130
    frame = pd.DataFrame({"text": [f"review {i}" for i in range(n)], "label": [i % 2 for i in range(n)]})
    frame.to_csv(tmp_path / "train.csv", index=False)
    frame.to_csv(tmp_path / "test.csv", index=False)
    seen = []
    real = sources._select
    monkeypatch.setattr(readers, "CHUNK_ROWS", 40)
    monkeypatch.setattr(columns, "BATCH_ROWS", 16)
    monkeypatch.setattr(sources, "_select", lambda f, *a: seen.append(len(f)) or real(f, *a))
    s = load_splits(DataConfig(source=str(tmp_path), train_size=60), seed=0)
    assert seen == [40, 40, 40, 10] * 2  # the parser never held more than a chunk
    assert isinstance(s.train.texts, Column) and len(s.train.texts) == 60
    picked = sources.stratified_subset(frame.label.to_numpy(), 60, 0)
    assert list(s.train.texts) == [f"review {i}" for i in picked]  # the subset's order, across batches
    assert s.train.texts[59] == f"review {picked[59]}" and s.train.rows.tolist() == (picked + 1).tolist()
    assert not list((tmp_path / "cache").rglob("*.arrow"))  # nothing left on disk by the readers


def test_a_same_pid_writer_on_another_host_keeps_its_temporary_file(tmp_path):
    # a cache shared by hosts: the other host's tokenizer may run under this process's pid; the
    # temporary names were `<store>.ids.<pid>.tmp`, so this writer truncated and renamed its file
    store = tmp_path / "abc.v1"
    theirs = [tmp_path / f"abc.v1.ids.{os.getpid()}.tmp", tmp_path / f"abc.v1.offsets.{os.getpid()}.tmp.npy"]
    for file in theirs:
        file.write_bytes(b"another host's ids")
    batching.write_store(store, iter([[[5, 6, 7], [8]]]), np.uint16, 10)
    assert [x.tolist() for x in store_rows(store)] == [[5, 6, 7], [8]]
    assert all(file.read_bytes() == b"another host's ids" for file in theirs)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["abc.v1.ids", "abc.v1.offsets.npy", "abc.v1.json", *(f.name for f in theirs)])  # none of ours left

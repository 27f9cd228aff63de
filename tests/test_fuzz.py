"""Malformed recipes and data files: every one ends in a clean one-line error, never a traceback."""
import dataclasses
import random

import pytest

from conftest import run_cli, tiny_overrides
from engine.config import DataConfig, Recipe, load_recipe
from engine.errors import DataError, RecipeError
from engine.sources import load_splits

rng = random.Random(1234)
RANDOM_BYTES = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) for _ in range(40)]
# Every case here must be refused: one-line RecipeError naming the file (exit 2 from the CLIs).
RECIPES = [
    b"- 1\n- 2\n", b"42", b"'just a string'", b"train: 5", b"train: [1, 2]",
    b"train:\n  lr: [1]\n", b"train:\n  epochs: yes\n", b"model:\n  name_or_path: {a: 1}\n",
    b"data:\n  max_length: -3\n", b"data:\n  where: [a]\n", b"peft:\n  method: lorax\n",
    b"train: {lr: .inf}", b"train: {lr: .nan}", b"train: {epochs: .inf}", b"train: {weight_decay: -1}",
    b"train: {max_grad_norm: -.5}", b"seed: 1.5", b"output_dir: [x]", b"\x00\x01\x02", b"a" * 200_000,
    b"&a [*a]", b"!!python/object:os.system 'echo hi'",
    b"{" * 1000, b"train:\n  batch_size: 99999999999999999999999\n",
] + RANDOM_BYTES  # seeded: none of these 40 happens to be a valid recipe

# Odd but valid: each must load to exactly the recipe it spells, nothing else.
VALID = {
    b"": {}, b"\n": {}, b"~": {},
    b"train:\n" + b"  " * 5000 + b"lr: 1": {"lr": 1.0},  # deep indentation is still one mapping
}


@pytest.mark.parametrize("i", range(len(RECIPES)))
def test_malformed_recipe_is_a_recipe_error(tmp_path, i):
    f = tmp_path / "r.yaml"
    f.write_bytes(RECIPES[i])
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    assert "\n" not in str(e.value) and str(f) in str(e.value)


@pytest.mark.parametrize("content", list(VALID))
def test_odd_but_valid_recipe_loads_to_what_it_says(tmp_path, content):
    f = tmp_path / "r.yaml"
    f.write_bytes(content)
    expected = Recipe()
    expected.train = dataclasses.replace(expected.train, **VALID[content])
    assert load_recipe(f) == expected


DATA = {
    "csv": [b"", b"text,label\n", b"\xff\xfe\x00", b"text,label\n\"unclosed,1\n", b"a,b\n1,2\n",
            b"text,label\nhi,1.5\n", b"text,label\nhi,\n", b"text,label\nhi,-1\n"],
    "tsv": [b"", b"text\tlabel\nok\tpositive\n", b"\x00" * 64, b"text\tlabel\n\t\n"],
    "jsonl": [b"", b"{not json}\n", b"[1,2]\n", b'{"text": 5, "label": 1}\n', b'{"text": "a"}\n'],
    "parquet": [b"", b"PAR1", b"PAR1\x00\x00PAR1"] + RANDOM_BYTES[:5],
}


@pytest.mark.parametrize("suffix, i", [(s, i) for s, cases in DATA.items() for i in range(len(cases))])
def test_malformed_data_file_is_a_data_error(tmp_path, suffix, i):
    (tmp_path / f"train.{suffix}").write_bytes(DATA[suffix][i])
    (tmp_path / f"test.{suffix}").write_bytes(DATA[suffix][i])
    with pytest.raises(DataError) as e:
        load_splits(DataConfig(source=str(tmp_path)), seed=0)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_a_huge_line_is_just_a_long_text(tmp_path):
    (tmp_path / "train.csv").write_bytes(b"text,label\n" + b"x" * 5_000_000 + b",1\nshort,0\n")
    s = load_splits(DataConfig(source=str(tmp_path), eval_split="train"), seed=0)
    assert len(s.train.texts[0]) == 5_000_000


@pytest.mark.parametrize("content", [RECIPES[0], RECIPES[3], RECIPES[18], RANDOM_BYTES[0], b"train:\n  lr: abc\n",
                                     b"train: {lr: .inf}", b"train: {epochs: .inf}", b"train: {lr: .nan}",
                                     b"train: {batch_size: 99999999999999999999999}"])
def test_cli_malformed_recipe_exits_2_without_traceback(tmp_path, content):
    f = tmp_path / "r.yaml"
    f.write_bytes(content)
    p = run_cli("launch/train.py", "--recipe", f, f"output_dir={tmp_path / 'out'}", "data.source=/nowhere", timeout=60)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\xfd", b"text,label\nhi,7\n"])
def test_cli_malformed_data_exits_2_without_traceback(tmp_path, tiny_bert, content):
    (tmp_path / "train.csv").write_bytes(content)
    (tmp_path / "test.csv").write_bytes(content)
    p = run_cli("launch/train.py", "--recipe", "/dev/null",
                *tiny_overrides(tiny_bert, str(tmp_path), tmp_path / "out"), timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and p.stderr.strip().startswith("error: ")
    assert not (tmp_path / "out" / "metrics.json").exists()

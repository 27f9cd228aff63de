"""Malformed recipes and data files: every one ends in a clean one-line error, never a traceback."""
import dataclasses
import json
import math
import random
import types
import typing

import pytest
import yaml

from conftest import run_cli, tiny_overrides
from engine.config import DataConfig, Recipe
from engine.errors import DataError, RecipeError
from engine.recipe_yaml import load_recipe
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


# ---- every recipe key x {wrong type, negative, zero, huge, NaN, empty string} --------------------

def _leaf_keys(schema, prefix=""):
    """(dotted key, type) of every recipe key, read from the dataclasses: a key added later is fuzzed too."""
    out = []
    for name, tp in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(tp):
            out += _leaf_keys(tp, f"{prefix}{name}.")
        else:
            out.append((prefix + name, tp))
    return out


KEYS = _leaf_keys(Recipe)
HUGE = {int: 10**12, float: 1e300}


def _base_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return _base_type(args[0]) if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp


def _fuzz_values(tp) -> dict:
    base = _base_type(tp)
    scalar_wrong = 5 if base is str or typing.get_origin(base) in (list, dict, typing.Literal) else "abc"
    return {"wrong type": scalar_wrong, "nested list": [[1]], "negative": -1, "zero": 0,
            "huge": HUGE.get(base, 10**12), "NaN": float("nan"), "empty string": ""}


CASES = [(key, kind, value) for key, tp in KEYS for kind, value in _fuzz_values(tp).items()]
# The fuzz values a recipe may hold: each runs in test_fuzz_values_valid_at_load_run_cleanly
VALID_AT_LOAD = {
    ("seed", "zero"), ("train.max_steps", "zero"), ("train.eval_every", "zero"), ("data.holdout_size", "zero"),
    ("checkpoint.every", "zero"), ("checkpoint.keep", "zero"), ("train.weight_decay", "zero"),
    ("train.warmup_ratio", "zero"), ("train.min_lr_ratio", "zero"), ("train.max_grad_norm", "zero"),
    ("peft.dropout", "zero"), ("train.early_stopping_patience", "zero"), ("train.max_grad_norm", "huge"),
}


def test_every_recipe_key_is_fuzzed():
    keys = {k for k, _ in KEYS}
    assert len(keys) >= 57 and {"output_dir", "data.cache_dir", "distributed.backend", "peft.target_modules"} <= keys
    assert {k for k, _ in VALID_AT_LOAD} <= keys


@pytest.mark.parametrize("key, kind, value", CASES, ids=[f"{k}-{kind}" for k, kind, _ in CASES])
def test_fuzzed_recipe_key_is_one_line_at_load(tmp_path, key, kind, value):
    section, _, leaf = key.rpartition(".")
    raw = {section: {leaf: value}} if section else {leaf: value}
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(raw))
    if (key, kind) in VALID_AT_LOAD:
        load_recipe(f)
        return
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    assert "\n" not in str(e.value) and str(f) in str(e.value) and f"'{key}" in str(e.value)


@pytest.mark.parametrize("kind", ["zero", "huge"])
def test_fuzz_values_valid_at_load_run_cleanly(tiny_bert, tiny_data, tmp_path, kind):
    """Every fuzz value the recipe accepts, together in one run (per kind): it trains to the end."""
    values = {"zero": 0, "huge": 1e300}[kind]
    overrides = [f"{key}={values}" for key, k in sorted(VALID_AT_LOAD) if k == kind]
    if kind == "huge":  # the adapters' keys too, with a method that reads them
        overrides += ["peft.method=lora"]
    out = tmp_path / "out"
    p = run_cli("launch/train.py", "--recipe", "/dev/null", *tiny_overrides(tiny_bert, tiny_data, out), *overrides,
                "train.epochs=2", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["tuned"]["n"] == 33 and math.isfinite(m["tuned"]["loss"]) and m["train"]["steps"] > 0
    assert not (out / "checkpoints").exists() or kind != "zero"  # checkpoint.keep=0 writes none


# ---- the launchers' arguments: one line on stderr, exit 2, nothing written ------------------------
# {model}, {data}, {out}, {tmp}: a tiny model, tiny data, an output folder, a scratch folder
LONG = "x" * 5000  # past any file name the system allows
TRAIN = ["--recipe", "/dev/null", "model.name_or_path={model}", "data.source={data}", "output_dir={out}",
         "data.max_length=32", "train.batch_size=8", "train.max_steps=2", "train.num_threads=1"]
EVAL = ["--model", "{model}", "--data", "{data}", "--max-length", "32"]
LAUNCHER_CASES = [
    ("train", [], "the following arguments are required: --recipe"),
    ("train", ["--recipe", "{tmp}"], "cannot read recipe"),
    ("train", ["--recipe", "/dev/null", "train.lr"], "expected key.sub=value"),
    ("train", ["--recipe", "/dev/null", "=3"], "expected key.sub=value"),
    ("train", [*TRAIN, "--bogus"], "unrecognized arguments: --bogus"),
    ("train", [*TRAIN, "output_dir={tmp}/a_file/out"], "'output_dir' cannot be created"),
    ("train", [*TRAIN, "data.cache_dir={tmp}/a_file/cache"], "'data.cache_dir' cannot be created"),
    ("train", [*TRAIN, "--resume", "{tmp}/nowhere"], "not a checkpoint (no state.json)"),
    ("train", [*TRAIN, "--resume", "{tmp}/no_fingerprint"], "not a training checkpoint of this engine"),
    ("train", [*TRAIN, "distributed.strategy=ddp", "distributed.backend=nccl"], "this torch build has no nccl"),
    ("train", [*TRAIN, "data.source={tmp}/" + LONG], "data.source does not exist"),
    ("evaluate", [], "the following arguments are required: --model"),
    ("evaluate", [*EVAL, "--batch-size", "0"], "argument --batch-size: must be in 1.."),
    ("evaluate", [*EVAL, "--size", "0"], "argument --size: must be in 1.."),
    ("evaluate", [*EVAL, "--size", "-30"], "argument --size: must be in 1.."),  # scored 3 examples, exit 0
    ("evaluate", [*EVAL, "--size", "1e3"], "argument --size: expected a whole number"),
    ("evaluate", [*EVAL, "--max-length", "99999999999999"], "argument --max-length: must be in 1.."),
    ("evaluate", [*EVAL, "--truncation", "head_tail", "--head-tokens", "32"], "--head-tokens (32) must be below"),
    ("evaluate", [*EVAL, "--encoding", "utf-9"], "not a known text encoding"),
    ("evaluate", [*EVAL, "--precision", "fp8"], "invalid choice: 'fp8'"),
    ("evaluate", [*EVAL, "--output", "{tmp}"], "cannot be written (it is a folder)"),
    ("evaluate", [*EVAL, "--split", "nope"], "no split 'nope'"),
    ("evaluate", [*EVAL, "--max-length", "129"], "is past the 128 positions"),
    ("evaluate", ["--model", "{tmp}/" + LONG, "--data", "{data}"], "cannot load tokenizer"),
    ("compare", [], "the following arguments are required: --recipe"),
    ("compare", ["--recipe", "/dev/null", "models=[]"], "'models' is empty"),
    ("compare", ["--recipe", "/dev/null", "batch_size=0"], "'batch_size' must be >= 1"),
    ("compare", ["--recipe", "/dev/null", "output_dir={tmp}/a_file/c"], "'output_dir' cannot be created"),
    ("compare", ["--recipe", "/dev/null", "models=[vader]", "output_dir={out}", "phrases_file={tmp}/" + LONG],
     "phrases_file does not exist"),
    ("compare", ["--recipe", "/dev/null", "models=[vader]", "output_dir={out}", "datasets=[{{source: {tmp}/nowhere}}]"],
     "data.source does not exist"),
]


@pytest.mark.parametrize("launcher, args, expected", LAUNCHER_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(LAUNCHER_CASES)])
def test_launcher_arguments_fail_with_one_line(tiny_bert, tiny_data, tmp_path, launcher, args, expected):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "no_fingerprint").mkdir()
    (tmp_path / "no_fingerprint" / "state.json").write_text('{"loop": {"step": 2}}')
    out = tmp_path / "out"
    fill = {"model": tiny_bert, "data": tiny_data, "out": out, "tmp": tmp_path}
    p = run_cli(f"launch/{launcher}.py", *[a.format(**fill) for a in args], timeout=180)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], p.stderr[-3000:]
    assert not (out / "metrics.json").exists() and not (out / "base").exists() and not (out / "report.json").exists()
